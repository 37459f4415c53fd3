"""Services are closed to whoever does not hold their secret: the Prefect server as `make ui`
starts it (auth string, CSRF), the Prefect clients as the Makefile starts them, Ray's token file."""
from __future__ import annotations

import base64
import json
import os
import re
import stat
import urllib.error
import urllib.request

import pytest

from tessera.core.localray import local_ray_env
from tessera.core.secretfile import secret_file

from .test_deploy import BIN, REPO, free_port, start, stop, wait_until_healthy


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_secret_file_is_readable_by_its_owner_only(tmp_path):
    old = os.umask(0)  # the widest umask: the file must still be 0600
    try:
        value = secret_file(tmp_path / "home" / "api_auth_string")
    finally:
        os.umask(old)
    assert re.fullmatch(r"[0-9a-f]{64}", value)
    assert mode(tmp_path / "home" / "api_auth_string") == 0o600 and mode(tmp_path / "home") == 0o700
    assert secret_file(tmp_path / "home" / "api_auth_string") == value  # kept, not replaced
    loose = tmp_path / "loose"
    loose.write_text("kept\n")
    loose.chmod(0o644)
    assert secret_file(loose) == "kept" and mode(loose) == 0o600


def test_a_local_ray_token_is_created_owner_only(tmp_path):
    env = local_ray_env({"HOME": str(tmp_path), "PATH": os.environ["PATH"]})
    token = tmp_path / ".ray" / "auth_token"
    assert mode(token) == 0o600 and mode(tmp_path / ".ray") == 0o700
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())
    assert env.get("RAY_AUTH_MODE", "token") == "token"
    # A token Ray wrote earlier, readable by everyone, is narrowed and kept.
    token.chmod(0o644)
    before = token.read_text()
    local_ray_env({"HOME": str(tmp_path), "PATH": os.environ["PATH"]})
    assert mode(token) == 0o600 and token.read_text() == before


def makefile_env(variable: str, auth_file: str) -> dict[str, str]:
    """NAME=VALUE pairs of a Makefile variable, with the auth file read the way the shell would."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    line = re.search(rf"^{variable} = (.*)$", text, re.M).group(1)
    secret = open(auth_file).read().strip()
    pairs = dict(re.findall(r'(PREFECT_\w+)=("[^"]*"|\S+)', line))
    return {k: secret if "cat $(PREFECT_AUTH_FILE)" in v else v.strip('"') for k, v in pairs.items()}


def test_the_makefile_settings_are_the_installed_prefects(tmp_path, monkeypatch):
    """Every setting `make ui` and the clients set has the meaning intended in this Prefect."""
    from prefect.settings import Settings

    auth = str(tmp_path / "api_auth_string")
    secret = secret_file(auth)
    for name, value in {**makefile_env("PREFECT_SERVER_ENV", auth), **makefile_env("PREFECT_CLIENT_ENV", auth)}.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.server.api.auth_string.get_secret_value() == secret
    assert settings.api.auth_string.get_secret_value() == secret
    assert settings.server.api.csrf_protection_enabled is True and settings.client.csrf_support_enabled is True
    assert settings.server.api.cors_allowed_origins == "http://127.0.0.1:4200"


@pytest.fixture(scope="module")
def secured_server(tmp_path_factory):
    """A Prefect server started with the settings `make ui` gives it."""
    home = tmp_path_factory.mktemp("prefect-home")
    auth = str(home / "api_auth_string")
    secret_file(auth)
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false", **makefile_env("PREFECT_SERVER_ENV", auth)}
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    proc = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, log)
    url = f"http://127.0.0.1:{port}/api"
    wait_until_healthy(proc, url, log)
    yield {"url": url, "auth": auth, "secret": open(auth).read().strip()}
    stop(proc)


def call(url: str, headers: dict, method: str = "GET") -> int:
    request = urllib.request.Request(url, data=b"{}" if method == "POST" else None, method=method,
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_prefect_server_refuses_requests_without_the_auth_string_or_a_csrf_token(secured_server):
    api = secured_server["url"]
    good = {"Authorization": "Basic " + base64.b64encode(secured_server["secret"].encode()).decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"guess").decode()}
    assert call(f"{api}/admin/version", {}) == 401
    assert call(f"{api}/admin/version", bad) == 401
    assert call(f"{api}/admin/version", good) == 200
    # A request that changes or reads through POST needs a CSRF token on top of the auth string.
    assert call(f"{api}/work_pools/filter", {}, "POST") in (401, 403)
    assert call(f"{api}/work_pools/filter", good, "POST") == 403


def test_a_client_set_up_as_the_makefile_does_gets_in(secured_server, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    for name, value in makefile_env("PREFECT_CLIENT_ENV", secured_server["auth"]).items():
        monkeypatch.setenv(name, value)
    with temporary_settings(updates={PREFECT_API_URL: secured_server["url"]}), get_client(sync_client=True) as client:
        assert client.read_work_pools() == []
        assert json.loads(json.dumps(client.hello().json())) is not None
