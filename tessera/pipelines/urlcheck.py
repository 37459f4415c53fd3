"""The URL guard: which URLs may be fetched, as a pure function, and enforced at connect time.

`check_url` looks at the text of a URL only (scheme, syntax, length, and literal addresses in
every disguise: decimal, hex, octal, short IPv4 forms, IPv4-mapped and 6to4 IPv6).
`GuardedOpener` enforces the same policy on the addresses a host name actually resolves to and
on every redirect, so neither DNS nor a 30x can lead a download into a blocked network.
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import urllib.request
from urllib.parse import urlsplit

from tessera.config.download import UrlPolicy

# Addresses that cloud providers serve instance metadata (and credentials) on.
METADATA_ADDRESSES = {
    ipaddress.ip_address("169.254.169.254"),
    ipaddress.ip_address("169.254.170.2"),
    ipaddress.ip_address("100.100.100.200"),
    ipaddress.ip_address("fd00:ec2::254"),
}
METADATA_HOSTS = {"metadata", "metadata.google.internal", "instance-data", "instance-data.ec2.internal"}
BLOCKED_PREFIX = "blocked_"


class BlockedAddress(Exception):
    """Raised at connect or redirect time; `drop_reason` is one of the blocked_* reasons.

    Not an OSError, so urllib lets it through unwrapped instead of retrying other addresses."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.drop_reason = reason


def parse_host_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address a literal host names, in any form a resolver would accept; None for a name."""
    host = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    # inet_aton accepts the legacy forms: 2130706433, 0x7f000001, 0177.0.0.1, 127.1.
    if host and all(c in "0123456789abcdefxABCDEFX." for c in host) and host[0].isdigit():
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def address_reason(ip, policy: UrlPolicy) -> str | None:
    """The drop reason for connecting to `ip` under `policy`, or None if it is allowed."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return address_reason(embedded, policy)
    if ip in METADATA_ADDRESSES:
        return "blocked_metadata"
    if ip.is_loopback:
        return None if policy.allow_loopback else "blocked_loopback"
    if ip.is_link_local:
        return None if policy.allow_link_local else "blocked_link_local"
    if ip.is_private or ip.is_unspecified or ip.is_reserved or ip.is_multicast or not ip.is_global:
        return None if policy.allow_private else "blocked_private"
    return None


def check_url(url: object, policy: UrlPolicy) -> str | None:
    """Why this URL must not be fetched (a drop reason), or None if it may be."""
    if not isinstance(url, str) or not url.strip():
        return "empty_url"
    if len(url) > policy.max_length:
        return "url_too_long"
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 or c == "\\" for c in url):
        return "malformed_url"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a bad port
    except ValueError:
        return "malformed_url"
    if parts.scheme.lower() not in policy.schemes:
        return "bad_scheme"
    host = (parts.hostname or "").rstrip(".")
    if not host or port == 0:
        return "malformed_url"
    ip = parse_host_ip(host)
    if ip is not None:
        return address_reason(ip, policy)
    if host in METADATA_HOSTS:
        return "blocked_metadata"
    if host == "localhost" or host.endswith(".localhost"):
        return None if policy.allow_loopback else "blocked_loopback"
    try:
        host.encode("idna")
    except UnicodeError:
        return "malformed_url"
    return None


def _checked_connect(conn: http.client.HTTPConnection, policy: UrlPolicy) -> None:
    """Resolve the host, refuse blocked addresses, and connect to the address that was checked."""
    infos = socket.getaddrinfo(conn.host, conn.port, type=socket.SOCK_STREAM)
    last_error: Exception | None = None
    for family, socktype, proto, _, sockaddr in infos:
        reason = address_reason(ipaddress.ip_address(sockaddr[0].split("%", 1)[0]), policy)
        if reason:
            raise BlockedAddress(reason, f"{conn.host} resolves to {sockaddr[0]}")
        try:
            sock = socket.socket(family, socktype, proto)
            sock.settimeout(conn.timeout if conn.timeout is not socket._GLOBAL_DEFAULT_TIMEOUT else None)
            sock.connect(sockaddr)
            conn.sock = sock
            return
        except OSError as e:
            last_error = e
    raise last_error or OSError(f"cannot connect to {conn.host}")


def make_opener(policy: UrlPolicy) -> urllib.request.OpenerDirector:
    """A urllib opener that applies `policy` at every connection and every redirect."""

    class GuardedHTTPConnection(http.client.HTTPConnection):
        def connect(self):
            _checked_connect(self, policy)

    class GuardedHTTPSConnection(http.client.HTTPSConnection):
        def connect(self):
            _checked_connect(self, policy)
            self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)

    class GuardedHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(GuardedHTTPConnection, req)

    class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(GuardedHTTPSConnection, req, context=self._context)

    class GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            reason = check_url(newurl, policy)
            if reason:
                raise BlockedAddress(reason, f"redirect to {newurl}")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return urllib.request.build_opener(GuardedHTTPHandler, GuardedHTTPSHandler, GuardedRedirectHandler)


def install_guard(policy: UrlPolicy) -> None:
    """Make every `urllib.request.urlopen` in this process (img2dataset's included) guarded."""
    urllib.request.install_opener(make_opener(policy))
