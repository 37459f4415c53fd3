"""Hugging Face hub downloads through the URL guard.

huggingface_hub makes every request through one httpx client it builds from a factory.
`hub_guard(policy)` swaps in a client whose transport checks each request's URL (`check_url`)
before it is sent, which covers every redirect (httpx follows them one request at a time), and
whose network backend connects only to addresses `resolve_checked` allowed, so a host name that
resolves into a blocked network is refused at the connection itself. Environment proxies are not
used. Xet storage (Rust networking outside this client) is turned off for the same reason.
"""
from __future__ import annotations

from contextlib import contextmanager

from tessera.config.download import UrlPolicy
from tessera.core.urlcheck import BlockedAddress, check_url, resolve_checked


def guarded_client(policy: UrlPolicy):
    """An httpx2 client for huggingface_hub that applies `policy` to every request and connection."""
    import httpcore2
    import httpx2
    from httpcore2._backends.sync import SyncBackend
    from huggingface_hub.utils._http import hf_request_event_hook

    class GuardedBackend(SyncBackend):
        def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            infos = resolve_checked(host, port, policy)
            last: Exception | None = None
            for *_, sockaddr in infos:  # the checked addresses, never a second lookup
                try:
                    return super().connect_tcp(sockaddr[0], port, timeout, local_address, socket_options)
                except httpcore2.ConnectError as e:
                    last = e
            raise last or httpcore2.ConnectError(f"{host}: no address to connect to")

    class GuardedTransport(httpx2.HTTPTransport):
        def __init__(self):
            super().__init__(trust_env=False)
            self._pool = httpcore2.ConnectionPool(ssl_context=httpx2.create_ssl_context(trust_env=False),
                                                  network_backend=GuardedBackend())

        def handle_request(self, request):
            url = str(request.url)
            reason = check_url(url, policy)
            if reason:
                raise BlockedAddress(reason, f"request to {url}")
            return super().handle_request(request)

    return httpx2.Client(transport=GuardedTransport(), follow_redirects=True, timeout=None,
                         event_hooks={"request": [hf_request_event_hook]})


@contextmanager
def hub_guard(policy: UrlPolicy):
    """huggingface_hub's requests go through `guarded_client(policy)` inside the block."""
    from huggingface_hub import close_session, constants, set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    xet = constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_DISABLE_XET = True
    set_client_factory(lambda: guarded_client(policy))
    close_session()  # the next request builds its client from the guarded factory
    try:
        yield
    finally:
        set_client_factory(default_client_factory)
        close_session()
        constants.HF_HUB_DISABLE_XET = xet
