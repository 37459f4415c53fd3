"""The guard end to end: hostile URLs and redirects, inside a fresh network namespace only."""
import pytest

from tessera.config.download import UrlPolicy
from tessera.demo.synthetic import SyntheticServer
from tessera.core.urlcheck import BlockedAddress, make_opener

from .download_helpers import LoopbackServer, outcomes, run_download, write_source

pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def server():
    with SyntheticServer(seed=0) as s:
        yield s


def hostile(base: str) -> dict[str, str]:
    """URL -> the reason it must end with. Names come from the namespace's hosts file."""
    port = base.rsplit(":", 1)[1]
    return {
        "http://10.0.0.1/a.jpg": "blocked_private",
        "http://0xa000001/a.jpg": "blocked_private",
        "http://[::ffff:192.168.0.1]/a.jpg": "blocked_private",
        "http://169.254.169.254/latest/meta-data/": "blocked_metadata",
        f"{base}/redirect?to=http://169.254.169.254/latest/meta-data/": "blocked_metadata",
        f"{base}/redirect?to=http://2852039166/": "blocked_metadata",
        f"{base}/redirect?to=http://10.0.0.1/a.jpg": "blocked_private",
        f"{base}/redirect?to=http://[fe80::1]/a.jpg": "blocked_link_local",
        f"{base}/redirect?to=file:///etc/passwd": "bad_scheme",
        f"http://evil.test:{port}/img/0.jpg": "blocked_private",           # resolves to 10.1.2.3
        f"http://metadata-alias.test:{port}/img/0.jpg": "blocked_metadata",
        f"{base}/redirect?to=http://evil.test:{port}/img/1.jpg": "blocked_private",
        "http://168.63.129.16/machine?comp=goalstate": "blocked_metadata",
        f"{base}/redirect?to=http://168.63.129.16/machine?comp=goalstate": "blocked_metadata",
        f"{base}/redirect?to=ftp://10.0.0.1/a.jpg": "bad_scheme",
    }


def test_opener_refuses_names_that_resolve_to_blocked_addresses(server):
    port = server.base.rsplit(":", 1)[1]
    opener = make_opener(UrlPolicy(allow_loopback=True))
    with opener.open(f"{server.base}/img/0.jpg", timeout=5) as r:
        assert r.status == 200
    with pytest.raises(BlockedAddress, match="blocked_private: evil.test resolves to 10.1.2.3"):
        opener.open(f"http://evil.test:{port}/img/0.jpg", timeout=5)
    with pytest.raises(BlockedAddress, match="blocked_loopback"):
        make_opener(UrlPolicy()).open(f"{server.base}/img/0.jpg", timeout=5)


def test_hostile_urls_end_blocked(server, ray_local, tmp_path):
    with LoopbackServer("drip") as drip:
        # A server that drips its body byte by byte is cut at the download's deadline.
        urls = {**hostile(server.base), f"{drip.base}/drip.jpg": "timeout"}
        source = write_source(str(tmp_path / "source.parquet"), server, 3, extra_urls=list(urls))
        result, store = run_download(source, str(tmp_path / "data"))
    ended = {url: outcome for url, outcome in outcomes(store).values()}
    for url, reason in urls.items():
        assert ended[url] == reason, url
    assert result.downloaded + sum(result.dropped.values()) == result.rows_in


def test_with_download_proxy_a_name_resolving_to_a_private_address_never_reaches_the_proxy(server):
    port = server.base.rsplit(":", 1)[1]
    with LoopbackServer("proxy") as proxy:
        opener = make_opener(UrlPolicy(allow_loopback=True), proxy=proxy.base)
        for url in (f"http://evil.test:{port}/img/0.jpg", "https://evil.test/img/0.jpg",
                    f"http://metadata-alias.test:{port}/img/0.jpg"):
            with pytest.raises(BlockedAddress, match="blocked_(private|metadata): "):
                opener.open(url, timeout=5)
        assert proxy.requests == []
        with opener.open(f"{server.base}/img/0.jpg", timeout=5) as r:  # allowed: through the proxy
            assert r.read() == b"from the proxy"
        assert proxy.requests == [f"GET {server.base}/img/0.jpg"]
