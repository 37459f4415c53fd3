"""Run the download stage on a synthetic set, for the download tests."""
from __future__ import annotations

import json
import random
import ssl
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pyarrow.parquet as pq

from tessera.config.download import DownloadConfig, SourceConfig, SyntheticConfig, UrlPolicy
from tessera.config.ray import RayConfig
from tessera.pipelines import download, intake
from tessera.core.store import ShardStore
from tessera.demo.synthetic import SyntheticServer, laion_row, make_rows, write_parquet

TIMEOUT = 2.0


def download_config(**kw) -> DownloadConfig:
    base = dict(shard_size=10, timeout=TIMEOUT, thread_count=8, max_tasks_in_flight=2,
                shard_retries=1, urls=UrlPolicy(allow_loopback=True))
    return DownloadConfig(**{**base, **kw})


def write_source(path: str, server: SyntheticServer, num_images: int, extra_urls=()) -> SourceConfig:
    cfg = SyntheticConfig(num_images=num_images)
    rows = make_rows(cfg, server.base, slow_seconds=TIMEOUT + 3)
    rng = random.Random(1)
    rows += [laion_row(rng, url, "an image", 600, 520) for url in extra_urls]
    write_parquet(rows, path, server.port)
    return SourceConfig(path=path, columns={"url": "URL", "caption": "TEXT"})


def run_download(source: SourceConfig, root: str, cfg: DownloadConfig | None = None):
    store = ShardStore(root)
    return download.run(source, cfg or download_config(), RayConfig(num_cpus=2), store), store


def outcomes(store: ShardStore) -> dict[int, tuple[str, str]]:
    """row_index -> (url, "downloaded" or drop reason), read back from the stage's files."""
    result = {}
    for name in store.list("download", ".tar"):
        shard = name[:-4]
        for row in pq.read_table(store.path("download", f"{shard}.parquet")).to_pylist():
            outcome = "downloaded" if row["status"] == "success" else intake.reason_for(row["error_message"])
            assert row["row_index"] not in result
            result[row["row_index"]] = (row["url"], outcome)
        for row in pq.read_table(store.path("download", f"{shard}_rejected.parquet")).to_pylist():
            assert row["row_index"] not in result
            result[row["row_index"]] = (row["url"], row["reason"])
    return result


def url_path(url: str, base: str) -> str:
    """The path part of a URL on the synthetic server (query dropped); other URLs as they are."""
    return urlsplit(url).path if url.startswith(base) else url


def tar_samples(store: ShardStore) -> dict[str, dict]:
    """key -> {ext: bytes} over every download tar."""
    samples: dict[str, dict] = {}
    for name in store.list("download", ".tar"):
        with tarfile.open(store.path("download", name)) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def sample_meta(samples: dict[str, dict]) -> dict[str, dict]:
    return {k: json.loads(v["json"]) for k, v in samples.items()}


# Loopback servers for the guard's tests -------------------------------------------------------
class _Quiet(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _Drip(_Quiet):
    """Answers 200 with a large Content-Length, then one byte every `interval` seconds: no single
    read ever waits long, so only a deadline over the whole download stops it."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(100000):
                self.wfile.write(b"\xff")
                self.wfile.flush()
                time.sleep(self.server.interval)
        except OSError:
            pass


class _Proxy(_Quiet):
    """A stand-in for an egress proxy: records each request line; answers a GET itself, and
    tunnels a CONNECT to the loopback port it names."""

    def do_GET(self):
        self.server.requests.append(f"GET {self.path}")
        body = b"from the proxy"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_CONNECT(self):
        import selectors
        import socket

        self.server.requests.append(f"CONNECT {self.path}")
        upstream = socket.create_connection(("127.0.0.1", int(self.path.rsplit(":", 1)[1])))
        self.send_response(200)
        self.end_headers()
        with upstream, selectors.DefaultSelector() as sel:
            sel.register(self.connection, selectors.EVENT_READ, upstream)
            sel.register(upstream, selectors.EVENT_READ, self.connection)
            while True:
                for key, _ in sel.select():
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)


class LoopbackServer:
    """`with LoopbackServer("drip") as s: s.base`; "proxy" servers record `s.requests`; with
    `tls=(cert, key)` the server speaks https."""

    def __init__(self, kind: str, interval: float = 0.2, tls: tuple[str, str] | None = None):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), {"drip": _Drip, "proxy": _Proxy}[kind])
        self.server.daemon_threads = True
        self.server.interval = interval
        self.server.requests = []
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.base = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.requests = self.server.requests

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def self_signed_cert(folder) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, as PEM files in `folder`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = f"{folder}/cert.pem", f"{folder}/key.pem"
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path
