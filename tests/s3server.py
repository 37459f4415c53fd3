"""A real S3 API server on loopback for the tests: moto's standalone server in a subprocess."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

from tessera.config.storage import StorageConfig, apply_storage

# moto accepts any credentials; botocore needs some to sign its requests.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server(startup_s: float = 60) -> Iterator[str]:
    """Start `python -m moto.server` on 127.0.0.1; yields its endpoint URL, stops it after."""
    port = free_port()
    # Its request log goes to a file: a pipe nobody reads would fill and stop the server.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **CREDENTIALS})
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"moto server exited: {log.read().decode()[-2000:]}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not answer on {endpoint} within {startup_s} s") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@contextmanager
def s3_with_credentials() -> Iterator[str]:
    """The test server, with its credentials in the environment while it runs; afterwards the
    environment and the process's storage settings are as they were."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        with s3_server() as url:
            yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        apply_storage(StorageConfig())
