"""The URL check as a pure function. Cases naming non-loopback addresses are `netns` tests."""
import pytest

from tessera.config.download import UrlPolicy
from tessera.pipelines.urlcheck import check_url

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
    ("http://224.0.0.1/a.jpg", "blocked_private"),          # multicast
])
def test_private_link_local_and_metadata(url, reason):
    assert check_url(url, STRICT) == reason
    assert check_url(url, LOOPBACK_OK) == reason


@pytest.mark.netns
def test_policy_flags_open_only_their_own_range():
    private_ok = UrlPolicy(allow_private=True)
    assert check_url("http://10.0.0.1/a.jpg", private_ok) is None
    assert check_url("http://169.254.1.1/a.jpg", private_ok) == "blocked_link_local"
    assert check_url("http://169.254.169.254/", UrlPolicy(allow_link_local=True)) == "blocked_metadata"
    assert check_url("http://93.184.215.14/a.jpg", STRICT) is None
    assert check_url("https://images.example.com/a.jpg", STRICT) is None
