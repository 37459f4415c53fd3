"""The URL guard: which URLs may be fetched, as a pure function, and enforced while fetching.

`check_url` looks at the text of a URL only (scheme, syntax, length, and literal addresses in
every disguise: decimal, hex, octal, short IPv4 forms, IPv4-mapped and 6to4 IPv6).
`make_opener` enforces the same policy on the addresses a host name actually resolves to and
on every redirect, so neither DNS nor a 30x can lead a download into a blocked network, and
gives every download one wall-clock deadline (connect, TLS, redirects and every read together).
"""
from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.request
from functools import partial
from urllib.parse import urlsplit

from tessera.config.download import UrlPolicy

# Every address known to serve cloud instance metadata, credentials or host configuration, with
# who serves it there. Refused whatever the policy allows (some of them are public addresses).
METADATA_ADDRESSES = {
    ipaddress.ip_address(address): cloud for address, cloud in {
        "169.254.169.254": "instance metadata: AWS, GCP, Azure, Oracle, OpenStack, DigitalOcean, "
                           "Hetzner, Linode, IBM Cloud, Huawei Cloud",
        "fd00:ec2::254": "AWS instance metadata (IPv6)",
        "169.254.170.2": "AWS ECS task metadata and credentials",
        "169.254.170.23": "AWS EKS Pod Identity agent (credentials)",
        "fd00:ec2::23": "AWS EKS Pod Identity agent (IPv6)",
        "fd20:ce::254": "GCP metadata server (IPv6)",
        "168.63.129.16": "Azure WireServer (VM agent, extensions, host configuration)",
        "100.100.100.200": "Alibaba Cloud instance metadata",
        "169.254.0.23": "Tencent Cloud instance metadata",
        "169.254.42.42": "Scaleway instance metadata",
        "192.0.0.192": "Oracle Cloud legacy instance metadata",
        "fd00:a9fe:a9fe::1": "Linode (Akamai) metadata (IPv6)",
        "fe80::a9fe:a9fe": "OpenStack metadata (IPv6)",
    }.items()
}
# Names of metadata services, refused by name (some resolve to public addresses).
METADATA_HOSTS = {
    "metadata": "GCP (short name)",
    "metadata.google.internal": "GCP",
    "instance-data": "AWS",
    "instance-data.ec2.internal": "AWS",
    "metadata.tencentyun.com": "Tencent Cloud",
    "metadata.platformequinix.com": "Equinix Metal",
    "metadata.packet.net": "Equinix Metal (former Packet)",
}
BLOCKED_PREFIX = "blocked_"


class BlockedAddress(Exception):
    """A fetch refused while under way: a host that resolves to a blocked address (a blocked_*
    reason) or a redirect that `check_url` refuses (its reason). The message starts with the
    reason. Not an OSError, so urllib lets it through unwrapped instead of trying other addresses."""

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


def resolve_checked(host: str, port: int, policy: UrlPolicy) -> list[tuple]:
    """Resolve `host` and refuse it if any of its addresses is blocked; the addresses to connect to."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        reason = address_reason(ipaddress.ip_address(sockaddr[0].split("%", 1)[0]), policy)
        if reason:
            raise BlockedAddress(reason, f"{host} resolves to {sockaddr[0]}")
    return infos


# The body cap --------------------------------------------------------------------------------
class TooLarge(Exception):
    """A response body over the cap: refused by its Content-Length, or cut off while read. The
    message starts with the drop reason. Not an OSError, so urllib lets it through unwrapped."""

    drop_reason = "too_large"

    def __init__(self, detail: str):
        super().__init__(f"{self.drop_reason}: {detail}")


class BodyCapHandler(urllib.request.BaseHandler):
    """Refuse a successful response whose Content-Length is over `cap` before reading it, and make
    its `read` stop (and raise) as soon as more than `cap` bytes have come, whatever the headers
    said (a missing, chunked or false length)."""

    handler_order = 900  # after the other processors have seen the response, before error handling

    def __init__(self, cap: int):
        self.cap = cap

    def http_response(self, req, response):
        if not 200 <= response.status < 300:
            return response
        declared = (response.getheader("Content-Length") or "").strip()
        if declared.isdigit() and int(declared) > self.cap:
            response.close()
            raise TooLarge(f"{req.full_url} declares {declared} bytes (at most {self.cap})")
        response.read = _capped_read(response, self.cap, req.full_url)
        return response

    https_response = http_response


def _capped_read(response, cap: int, url: str):
    """`response.read` that never holds more than `cap` + 1 bytes of the body."""
    read, got = response.read, 0

    def capped(amt: int | None = None) -> bytes:
        nonlocal got
        whole = amt is None or amt < 0
        want = cap + 1 - got if whole else min(amt, cap + 1 - got)
        parts = []
        while want > 0:
            chunk = read(min(want, 1 << 16))
            if not chunk:
                break
            parts.append(chunk)
            want -= len(chunk)
            got += len(chunk)
            if not whole:
                break
        if got > cap:
            response.close()
            raise TooLarge(f"{url}: the body passed {cap} bytes")
        return b"".join(parts)

    return capped


# The wall-clock deadline --------------------------------------------------------------------
class DeadlinePassed(TimeoutError):
    def __init__(self, seconds: float):
        super().__init__(f"timed out: the download took longer than its deadline of {seconds:g} s")


class _Deadline:
    """Every blocking call waits at most until the deadline, so the calls together do too."""

    deadline: float | None = None
    seconds: float = 0.0

    def _wait(self) -> None:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise DeadlinePassed(self.seconds)
            self.settimeout(left)

    def connect(self, address):
        self._wait()
        return super().connect(address)

    def recv(self, *args):
        self._wait()
        return super().recv(*args)

    def recv_into(self, *args):
        self._wait()
        return super().recv_into(*args)

    def send(self, *args):
        self._wait()
        return super().send(*args)

    def sendall(self, *args):
        self._wait()
        return super().sendall(*args)


class DeadlineSocket(_Deadline, socket.socket):
    pass


class DeadlineSSLSocket(_Deadline, ssl.SSLSocket):
    def read(self, *args):
        self._wait()
        return super().read(*args)

    def do_handshake(self, *args):
        self._wait()
        return super().do_handshake(*args)


def _connect(infos: list[tuple], deadline: float | None, seconds: float, timeout=None) -> socket.socket:
    """Connect to the first address of `infos` that answers, under the deadline (without one,
    each connect and read waits at most `timeout`)."""
    last_error: Exception | None = None
    for family, socktype, proto, _, sockaddr in infos:
        sock = DeadlineSocket(family, socktype, proto)
        sock.deadline, sock.seconds = deadline, seconds
        if deadline is None and isinstance(timeout, (int, float)):
            sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            last_error = e
            if isinstance(e, DeadlinePassed):
                break
    raise last_error or OSError("no address to connect to")


# The opener ---------------------------------------------------------------------------------
def make_opener(policy: UrlPolicy, proxy: str | None = None, max_body_bytes: int | None = None,
                whole_deadline: bool = True) -> urllib.request.OpenerDirector:
    """A urllib opener for http(s) only that applies `policy` at every connection and redirect.

    `timeout` given to `open` is a wall-clock deadline for the whole download: connecting, TLS,
    every redirect and every read of the body. Proxy variables of the environment are ignored;
    with `proxy` requests go through that proxy (except to hosts in no_proxy), and the target's
    resolved addresses are checked before the request is sent (the proxy itself is trusted).
    With `max_body_bytes`, a successful response's body is capped (`BodyCapHandler`). With
    `whole_deadline` False, `timeout` bounds each connect and read instead (a large file)."""
    # urllib points a proxied request's `host` at the proxy's host:port, as written in its URL.
    proxy_hostport = urlsplit(proxy).netloc.rsplit("@", 1)[-1] if proxy else None

    class GuardedHTTPConnection(http.client.HTTPConnection):
        def __init__(self, *args, deadline=None, seconds=0.0, via_proxy=False, **kwargs):
            super().__init__(*args, **kwargs)
            self.deadline, self.seconds, self.via_proxy = deadline, seconds, via_proxy
            self._create_connection = self._open_socket

        def _open_socket(self, address, timeout=None, source_address=None):
            host, port = address
            # A direct connection goes to the addresses that were checked; the proxy is not the
            # target (the target was checked before the request was made).
            infos = (socket.getaddrinfo(host, port, type=socket.SOCK_STREAM) if self.via_proxy
                     else resolve_checked(host, port, policy))
            return _connect(infos, self.deadline, self.seconds, timeout)

    class GuardedHTTPSConnection(GuardedHTTPConnection, http.client.HTTPSConnection):
        def connect(self):
            http.client.HTTPConnection.connect(self)  # the socket, and a proxy's CONNECT tunnel
            sock = self._context.wrap_socket(self.sock, server_hostname=self._tunnel_host or self.host,
                                             do_handshake_on_connect=False)
            sock.deadline, sock.seconds = self.deadline, self.seconds
            sock.do_handshake()
            self.sock = sock

    def connection(cls, req, **kwargs):
        via_proxy = proxy_hostport is not None and req.host == proxy_hostport
        if via_proxy:
            target = urlsplit(req.full_url)
            resolve_checked(target.hostname, target.port or {"http": 80, "https": 443}[target.scheme], policy)
        return partial(cls, deadline=getattr(req, "deadline", None), seconds=getattr(req, "seconds", 0.0),
                       via_proxy=via_proxy, **kwargs)

    class GuardedHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(connection(GuardedHTTPConnection, req), req)

    context = ssl.create_default_context()
    context.sslsocket_class = DeadlineSSLSocket

    class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(connection(GuardedHTTPSConnection, req, context=context), req)

    class GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            reason = check_url(newurl, policy)
            if reason:
                raise BlockedAddress(reason, f"redirect to {newurl}")
            new = super().redirect_request(req, fp, code, msg, headers, newurl)
            if new is not None:
                new.deadline, new.seconds = getattr(req, "deadline", None), getattr(req, "seconds", 0.0)
            return new

    class DeadlineOpener(urllib.request.OpenerDirector):
        def open(self, fullurl, data=None, timeout=socket._GLOBAL_DEFAULT_TIMEOUT):
            req = fullurl if isinstance(fullurl, urllib.request.Request) else urllib.request.Request(fullurl, data)
            if whole_deadline and getattr(req, "deadline", None) is None and isinstance(timeout, (int, float)):
                req.deadline, req.seconds = time.monotonic() + timeout, timeout
            return super().open(req, data, timeout)

    opener = DeadlineOpener()
    proxies = {"http": proxy, "https": proxy} if proxy else {}
    for handler in (urllib.request.ProxyHandler(proxies), urllib.request.UnknownHandler(),
                    GuardedHTTPHandler(), GuardedHTTPSHandler(context=context),
                    urllib.request.HTTPDefaultErrorHandler(), GuardedRedirectHandler(),
                    urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    if max_body_bytes is not None:
        opener.add_handler(BodyCapHandler(max_body_bytes))
    return opener


def install_guard(policy: UrlPolicy, proxy: str | None = None, max_body_bytes: int | None = None) -> None:
    """Make every `urllib.request.urlopen` in this process (img2dataset's included) guarded, with
    bodies capped at `max_body_bytes`."""
    urllib.request.install_opener(make_opener(policy, proxy, max_body_bytes))
