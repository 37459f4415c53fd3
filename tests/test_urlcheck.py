"""The URL check as a pure function, and the guarded opener against loopback servers.
Cases naming non-loopback addresses are `netns` tests."""
import ipaddress

import pytest

from tessera.config.download import UrlPolicy
from tessera.core.urlcheck import check_url

STRICT = UrlPolicy()
LOOPBACK_OK = UrlPolicy(allow_loopback=True)


@pytest.mark.parametrize("url, reason", [
    (None, "empty_url"),
    ("", "empty_url"),
    ("   ", "empty_url"),
    ("file:///etc/passwd", "bad_scheme"),
    ("data:image/png;base64,iVBORw0KGgo=", "bad_scheme"),
    ("javascript:alert(1)", "bad_scheme"),
    ("ftp://127.0.0.1/a.jpg", "bad_scheme"),
    ("gopher://127.0.0.1/", "bad_scheme"),
    ("http://exa mple.com/a.jpg", "malformed_url"),
    ("http://127.0.0.1\\@x/a.jpg", "malformed_url"),
    ("http://127.0.0.1:99999/a.jpg", "malformed_url"),
    ("http:///a.jpg", "malformed_url"),
    ("http://127.0.0.1/" + "a" * 3000, "url_too_long"),
    ("http://127.0.0.1/a.jpg", "blocked_loopback"),
    ("http://localhost:8000/a.jpg", "blocked_loopback"),
    ("http://LOCALHOST./a.jpg", "blocked_loopback"),
    ("http://images.localhost/a.jpg", "blocked_loopback"),
    ("http://[::1]/a.jpg", "blocked_loopback"),
    ("http://2130706433/a.jpg", "blocked_loopback"),       # decimal 127.0.0.1
    ("http://0x7f000001/a.jpg", "blocked_loopback"),       # hex
    ("http://0177.0.0.1/a.jpg", "blocked_loopback"),       # octal
    ("http://127.1/a.jpg", "blocked_loopback"),            # short form
    ("http://[::ffff:127.0.0.1]/a.jpg", "blocked_loopback"),
    ("http://user:pw@127.0.0.1/a.jpg", "blocked_loopback"),
])
def test_loopback_and_syntax(url, reason):
    assert check_url(url, STRICT) == reason


def test_loopback_allowed_only_when_configured():
    assert check_url("http://127.0.0.1:8000/a.jpg", LOOPBACK_OK) is None
    assert check_url("http://[::1]:8000/a.jpg", LOOPBACK_OK) is None
    assert check_url("HTTP://127.0.0.1/a.jpg", LOOPBACK_OK) is None


@pytest.mark.netns
@pytest.mark.parametrize("url, reason", [
    ("http://10.0.0.1/a.jpg", "blocked_private"),
    ("http://172.16.5.4/a.jpg", "blocked_private"),
    ("http://192.168.1.1/a.jpg", "blocked_private"),
    ("http://100.64.0.1/a.jpg", "blocked_private"),         # carrier-grade NAT
    ("http://0.0.0.0/a.jpg", "blocked_private"),
    ("http://[fc00::1]/a.jpg", "blocked_private"),
    ("http://0xa000001/a.jpg", "blocked_private"),          # hex 10.0.0.1
    ("http://167772161/a.jpg", "blocked_private"),          # decimal 10.0.0.1
    ("http://012.0.0.1/a.jpg", "blocked_private"),          # octal 10.0.0.1
    ("http://[::ffff:10.0.0.1]/a.jpg", "blocked_private"),
    ("http://[::ffff:a00:1]/a.jpg", "blocked_private"),
    ("http://[2002:a00:1::]/a.jpg", "blocked_private"),     # 6to4 wrapping 10.0.0.1
    ("http://169.254.1.1/a.jpg", "blocked_link_local"),
    ("http://[fe80::1]/a.jpg", "blocked_link_local"),
    ("http://[fe80::1%25eth0]/a.jpg", "blocked_link_local"),
    ("http://169.254.169.254/latest/meta-data/", "blocked_metadata"),
    ("http://2852039166/latest/meta-data/", "blocked_metadata"),  # decimal 169.254.169.254
    ("http://[::ffff:169.254.169.254]/", "blocked_metadata"),
    ("http://[fd00:ec2::254]/", "blocked_metadata"),
    ("http://100.100.100.200/", "blocked_metadata"),
    ("http://metadata.google.internal/computeMetadata/v1/", "blocked_metadata"),
    ("http://168.63.129.16/machine?comp=goalstate", "blocked_metadata"),  # Azure WireServer
    ("http://2822734096/", "blocked_metadata"),               # decimal 168.63.129.16
    ("http://[::ffff:168.63.129.16]/", "blocked_metadata"),
    ("http://[fd20:ce::254]/computeMetadata/v1/", "blocked_metadata"),
    ("http://169.254.170.2/v2/credentials/x", "blocked_metadata"),
    ("http://metadata.tencentyun.com/latest/meta-data/", "blocked_metadata"),
    ("http://224.0.0.1/a.jpg", "blocked_private"),          # multicast
])
def test_private_link_local_and_metadata(url, reason):
    assert check_url(url, STRICT) == reason
    assert check_url(url, LOOPBACK_OK) == reason


@pytest.mark.netns
def test_every_metadata_address_is_refused_whatever_the_policy_allows():
    from tessera.core.urlcheck import METADATA_ADDRESSES, METADATA_HOSTS

    anything = UrlPolicy(allow_loopback=True, allow_private=True, allow_link_local=True)
    for ip, cloud in METADATA_ADDRESSES.items():
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        assert cloud and check_url(f"http://{host}/", anything) == "blocked_metadata", ip
    for name, cloud in METADATA_HOSTS.items():
        assert cloud and check_url(f"http://{name}/", anything) == "blocked_metadata", name
    assert "Azure" in METADATA_ADDRESSES[ipaddress.ip_address("168.63.129.16")]


@pytest.mark.netns
def test_policy_flags_open_only_their_own_range():
    private_ok = UrlPolicy(allow_private=True)
    assert check_url("http://10.0.0.1/a.jpg", private_ok) is None
    assert check_url("http://169.254.1.1/a.jpg", private_ok) == "blocked_link_local"
    assert check_url("http://169.254.169.254/", UrlPolicy(allow_link_local=True)) == "blocked_metadata"
    assert check_url("http://93.184.215.14/a.jpg", STRICT) is None
    assert check_url("https://images.example.com/a.jpg", STRICT) is None


# The opener: deadline, redirects and proxies, against loopback servers -------------------------
import time  # noqa: E402
import urllib.request  # noqa: E402

from tessera.pipelines.intake import reason_for  # noqa: E402
from tessera.demo.synthetic import SyntheticServer  # noqa: E402
from tessera.core.urlcheck import BlockedAddress, install_guard, make_opener  # noqa: E402

from .download_helpers import LoopbackServer, self_signed_cert  # noqa: E402

PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


@pytest.fixture
def guarded(monkeypatch):
    """Install the guard the way a download task does, and put urllib back afterwards."""
    monkeypatch.setattr(urllib.request, "_opener", None)

    def install(policy=LOOPBACK_OK, proxy=None):
        install_guard(policy, proxy)

    return install


def fetch_like_img2dataset(url: str, timeout: float) -> tuple[str, float]:
    """img2dataset's own download function, as a download task calls it: (reason, seconds)."""
    from img2dataset.downloader import download_image

    start = time.monotonic()
    _, stream, error = download_image((0, url), timeout, "tessera", None)
    return ("downloaded" if stream is not None else reason_for(error)), time.monotonic() - start


def test_a_dripping_server_is_cut_at_the_deadline_and_recorded_as_timeout(guarded):
    guarded()
    with LoopbackServer("drip", interval=0.2) as drip:
        reason, seconds = fetch_like_img2dataset(f"{drip.base}/a.jpg", timeout=1.5)
    assert reason == "timeout"
    # Each byte comes within 0.2 s, so a per-read timeout would wait the full 100000 x 0.2 s.
    assert 1.4 < seconds < 4, seconds


def test_the_deadline_holds_over_tls_too(guarded, tmp_path, monkeypatch):
    cert, key = self_signed_cert(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", cert)  # trust the test's certificate
    guarded()
    with LoopbackServer("proxy", tls=(cert, key)) as server:
        with urllib.request.urlopen(f"{server.base}/a.jpg", timeout=5) as r:
            assert r.read() == b"from the proxy"
    with LoopbackServer("drip", interval=0.2, tls=(cert, key)) as drip:
        reason, seconds = fetch_like_img2dataset(f"{drip.base}/a.jpg", timeout=1.5)
    assert reason == "timeout" and 1.4 < seconds < 4, (reason, seconds)


def test_a_refused_redirect_keeps_its_own_reason(guarded):
    with SyntheticServer(seed=0) as server:
        redirect = f"{server.base}/redirect?to="
        guarded()
        assert fetch_like_img2dataset(f"{server.base}/img/0.jpg", 5)[0] == "downloaded"
        for target, reason in [
            ("ftp://127.0.0.1/a.jpg", "bad_scheme"),
            ("file:///etc/passwd", "bad_scheme"),
            ("gopher://127.0.0.1/", "bad_scheme"),
            ("http://127.0.0.1/" + "a" * 3000, "url_too_long"),
            ("http://127.0.0.1:99999/a.jpg", "malformed_url"),
        ]:
            assert fetch_like_img2dataset(redirect + target, 5)[0] == reason, target
        guarded(STRICT)  # loopback refused: the redirect's address, not the first hop's, decides
        assert fetch_like_img2dataset(f"{redirect}http://127.0.0.1:1/a.jpg", 5)[0] == "blocked_loopback"


def test_proxy_variables_are_ignored_without_download_proxy(guarded, monkeypatch):
    with LoopbackServer("proxy") as proxy, SyntheticServer(seed=0) as server:
        for name in PROXY_VARIABLES:
            monkeypatch.setenv(name, proxy.base)
        monkeypatch.setenv("no_proxy", "")
        guarded()
        assert fetch_like_img2dataset(f"{server.base}/img/0.jpg", 5)[0] == "downloaded"
    assert proxy.requests == []


def test_download_proxy_carries_requests_and_the_target_is_checked_first():
    with LoopbackServer("proxy") as proxy:
        opener = make_opener(LOOPBACK_OK, proxy=proxy.base)
        with opener.open("http://127.0.0.1:9/a.jpg", timeout=5) as r:
            assert r.read() == b"from the proxy"
        assert proxy.requests == ["GET http://127.0.0.1:9/a.jpg"]
        strict = make_opener(STRICT, proxy=proxy.base)
        for url in ("http://127.0.0.1:9/b.jpg", "https://localhost/c.jpg"):
            with pytest.raises(BlockedAddress, match="blocked_loopback"):
                strict.open(url, timeout=5)
    assert proxy.requests == ["GET http://127.0.0.1:9/a.jpg"]


def test_https_through_download_proxy_is_tunnelled_and_keeps_the_deadline(tmp_path, monkeypatch):
    cert, key = self_signed_cert(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", cert)
    with LoopbackServer("proxy") as proxy, LoopbackServer("proxy", tls=(cert, key)) as server, \
            LoopbackServer("drip", interval=0.2, tls=(cert, key)) as drip:
        opener = make_opener(LOOPBACK_OK, proxy=proxy.base)
        with opener.open(f"{server.base}/a.jpg", timeout=5) as r:
            assert r.read() == b"from the proxy"  # the TLS server's answer, through the tunnel
        assert server.requests == ["GET /a.jpg"]
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            with opener.open(f"{drip.base}/b.jpg", timeout=1.5) as r:
                r.read()
        assert time.monotonic() - start < 4
    assert [r.split(" ")[0] for r in proxy.requests] == ["CONNECT", "CONNECT"]


def test_a_proxy_is_written_as_a_url_with_a_port():
    from pydantic import ValidationError

    from tessera.config.download import DownloadConfig

    assert DownloadConfig(proxy="http://127.0.0.1:3128").proxy == "http://127.0.0.1:3128"
    for bad in ("127.0.0.1:3128", "socks5://127.0.0.1:1080", "http://127.0.0.1", "http://127.0.0.1:3128/x"):
        with pytest.raises(ValidationError, match="http://host:port"):
            DownloadConfig(proxy=bad)
