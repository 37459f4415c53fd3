"""`tessera fetch-models`: verified, resumable downloads into models_root, found there offline."""
from __future__ import annotations

import hashlib
import io
import os
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tessera.config import RunConfig, load_config
from tessera.config.models import ModelSource
from tessera.core.urlcheck import BlockedAddress
from tessera.models import fetch, refs
from tessera.models.hubguard import hub_guard
from tessera.pipelines import score
from tessera.fetch_models import fetch_models, named_models
from tests.conftest import REPO

WEIGHTS = os.urandom(300_000)
# The test servers speak plain http on loopback: allowed by name, as a private mirror would be.
LOCAL_MIRROR = {"allow_http": True, "allow_private": True}
LOCAL = fetch.url_policy(**LOCAL_MIRROR)


class FileServer:
    """Serves in-memory files on 127.0.0.1; honours `Range: bytes=N-` unless told not to; records
    each request's path, Range header and the number of body bytes sent."""

    def __init__(self, files: dict[str, bytes], ranges: bool = True):
        self.files, self.ranges, self.requests = files, ranges, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = outer.files.get(self.path)
                wanted = self.headers.get("Range")
                if body is None:
                    self.send_error(404)
                    outer.requests.append((self.path, wanted, 0))
                    return
                start = int(re.match(r"bytes=(\d+)-", wanted).group(1)) if wanted and outer.ranges else 0
                if start >= len(body) and start:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.end_headers()
                    outer.requests.append((self.path, wanted, 0))
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                self.wfile.write(body[start:])
                outer.requests.append((self.path, wanted, len(body) - start))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_partial_download_resumes_with_only_the_remainder_requested(tmp_path):
    dest = str(tmp_path / "m" / "head.pth")
    os.makedirs(os.path.dirname(dest))
    with open(dest + ".part", "wb") as f:  # what an interrupted fetch left
        f.write(WEIGHTS[:123_456])
    with FileServer({"/head.pth": WEIGHTS}) as server:
        got = fetch.download_url(f"{server.base}/head.pth", dest, sha(WEIGHTS), policy=LOCAL)
    assert got == sha(WEIGHTS) and open(dest, "rb").read() == WEIGHTS
    assert server.requests == [("/head.pth", "bytes=123456-", len(WEIGHTS) - 123_456)]
    assert not os.path.exists(dest + ".part")


def test_server_without_ranges_restarts_and_a_complete_part_is_only_verified(tmp_path):
    dest = str(tmp_path / "head.pth")
    open(dest + ".part", "wb").write(b"stale bytes")
    with FileServer({"/head.pth": WEIGHTS}, ranges=False) as server:
        fetch.download_url(f"{server.base}/head.pth", dest, sha(WEIGHTS), policy=LOCAL)
    assert open(dest, "rb").read() == WEIGHTS and server.requests[0][2] == len(WEIGHTS)
    # Everything already in the .part file: the server answers 416, nothing is sent, the file is checked.
    os.replace(dest, dest + ".part")
    with FileServer({"/head.pth": WEIGHTS}) as server:
        fetch.download_url(f"{server.base}/head.pth", dest, sha(WEIGHTS), policy=LOCAL)
    assert server.requests == [("/head.pth", f"bytes={len(WEIGHTS)}-", 0)] and open(dest, "rb").read() == WEIGHTS


def test_sha256_mismatch_is_refused_and_deleted(tmp_path):
    dest = str(tmp_path / "head.pth")
    with FileServer({"/head.pth": WEIGHTS}) as server:
        with pytest.raises(fetch.FetchError, match="does not match the pinned .* the download was deleted"):
            fetch.download_url(f"{server.base}/head.pth", dest, sha(b"something else"), policy=LOCAL)
        # A corrupt .part (bytes that are not the start of the file) is caught the same way.
        open(dest + ".part", "wb").write(b"x" * 1000)
        with pytest.raises(fetch.FetchError, match="does not match"):
            fetch.download_url(f"{server.base}/head.pth", dest, sha(WEIGHTS), policy=LOCAL)
    assert not os.path.exists(dest) and not os.path.exists(dest + ".part")


def test_a_present_file_is_checked_against_its_pin(tmp_path):
    source = ModelSource(url="http://127.0.0.1:9/never-asked.pth", sha256=sha(WEIGHTS))
    (tmp_path / "m.pth").write_bytes(WEIGHTS)
    assert fetch.fetch("m.pth", source, str(tmp_path))["action"] == "present"
    (tmp_path / "m.pth").write_bytes(WEIGHTS[:-1])
    with pytest.raises(fetch.FetchError, match="its sha256 is .* not the pinned .* delete it to fetch it again"):
        fetch.fetch("m.pth", source, str(tmp_path))


def test_http_errors_name_the_url(tmp_path):
    with FileServer({}) as server:
        with pytest.raises(fetch.FetchError, match=r"/nope.pth: HTTP 404"):
            fetch.download_url(f"{server.base}/nope.pth", str(tmp_path / "x.pth"), policy=LOCAL)


def _config(tmp_path, sources: dict, **filters) -> RunConfig:
    return RunConfig.model_validate({
        "name": "t", "data_root": str(tmp_path / "data"), "models_root": str(tmp_path / "models"),
        "source": {"path": "unused"}, "model_sources": sources, "caption": {"enabled": False},
        "filters": {"clip": {"checkpoint": "tiny:clip"}, "clip_score": {"source": "off"}, "dedup": {"enabled": False},
                    "nsfw": {"source": "off"}, "watermark": {"source": "off"}, **filters}})


def test_fetch_models_fetches_what_the_config_names_then_runs_find_it(tmp_path):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("clip_autokeras_binary_nsfw.pth", b"nsfw weights")
    with FileServer({"/aes.pth": WEIGHTS, "/nsfw.zip": archive.getvalue()}) as server:
        cfg = _config(tmp_path, {
            "heads/aes.pth": {"url": f"{server.base}/aes.pth", "sha256": sha(WEIGHTS), **LOCAL_MIRROR},
            "clip_autokeras_binary_nsfw.pth": {"url": f"{server.base}/nsfw.zip", "sha256": sha(archive.getvalue()),
                                               "member": "clip_autokeras_binary_nsfw.pth", **LOCAL_MIRROR}},
            aesthetic={"weights": "heads/aes.pth"}, nsfw={"source": "compute"})
        assert named_models(cfg) == [("filters.aesthetic.weights", "heads/aes.pth"),
                                     ("filters.nsfw.weights", "clip_autokeras_binary_nsfw.pth")]
        rows = fetch_models(cfg)
        assert [(r["action"], r.get("verified")) for r in rows] == [("fetched", True), ("fetched", True)]
        again = fetch_models(cfg)
    assert [r["action"] for r in again] == ["present", "present"]
    assert len(server.requests) == 2  # the second run asked nothing
    models = tmp_path / "models"
    assert (models / "heads" / "aes.pth").read_bytes() == WEIGHTS
    assert (models / "clip_autokeras_binary_nsfw.pth").read_bytes() == b"nsfw weights"
    assert not (models / "clip_autokeras_binary_nsfw.pth.zip").exists()
    # The run resolves the names to those files, offline.
    sources = {"aesthetic": {"source": "compute"}, "nsfw": {"source": "compute"}}
    paths = score.model_paths(cfg.filters, sources, cfg.models_root)
    assert paths["aesthetic"] == str(models / "heads" / "aes.pth")


def test_models_without_a_source_are_listed_after_fetching_the_others(tmp_path):
    with FileServer({"/aes.pth": WEIGHTS}) as server:
        cfg = _config(tmp_path, {"aes.pth": {"url": f"{server.base}/aes.pth", "sha256": sha(WEIGHTS), **LOCAL_MIRROR}},
                      aesthetic={"weights": "aes.pth"}, watermark={"source": "compute", "weights": "mine/wm.pt"})
        with pytest.raises(fetch.FetchError, match=r"filters.watermark.weights: 'mine/wm.pt' .* no known source"):
            fetch_models(cfg)
    assert (tmp_path / "models" / "aes.pth").exists()


def test_a_missing_model_stops_the_run_with_the_fetch_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model 'google/flan-t5-xl' is not in models_root .*"
                                                r"tessera fetch-models CONFIG"):
        refs.resolve("google/flan-t5-xl", str(tmp_path / "models"))
    cfg = _config(tmp_path, {}, aesthetic={"weights": "sac+logos+ava1-l14-linearMSE.pth"})
    with pytest.raises(FileNotFoundError, match=r"filters.aesthetic.weights: model 'sac\+logos.*tessera fetch-models"):
        score.model_paths(cfg.filters, {"aesthetic": {"source": "compute"}}, cfg.models_root)


def test_hub_ids_resolve_offline_from_models_root_or_a_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    models = tmp_path / "models"
    # What `snapshot_download(local_dir=models_root/org/name)` leaves, with fetch's marker.
    local = models / "org" / "encoder"
    (local / ".cache" / "huggingface").mkdir(parents=True)
    (local / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="completely .*tessera fetch-models"):
        fetch.locate("org/encoder", str(models))  # interrupted: no marker yet
    (local / fetch.SNAPSHOT_MARKER).write_text("{}")
    assert fetch.locate("org/encoder", str(models)) == str(local)
    # A hub cache filled by other means: models--org--name/{refs/main, snapshots/<commit>/}.
    cache = tmp_path / "hub"
    commit = "a" * 40
    snap = cache / "models--org--cached" / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (cache / "models--org--cached" / "refs").mkdir()
    (cache / "models--org--cached" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    assert fetch.locate("org/cached", str(models)) == str(snap)
    with pytest.raises(FileNotFoundError, match="'org/absent' is not in models_root"):
        fetch.locate("org/absent", str(models))


def test_every_model_of_the_shipped_configs_has_a_source():
    for name in ("laion_coco_stage1.yaml", "aesthetic_stage2.yaml"):
        cfg = load_config(REPO / "configs" / name)
        named = named_models(cfg)
        assert named, name
        missing = [(key, ref) for key, ref in named if fetch.source_for(ref, cfg.model_sources) is None]
        assert missing == [], name
    refs = dict(named_models(load_config(REPO / "configs" / "aesthetic_stage2.yaml")))
    assert refs["caption.model"] == "llava-hf/llava-1.5-7b-hf"
    assert fetch.source_for("sac+logos+ava1-l14-linearMSE.pth").sha256.startswith("21dd590f")
    assert fetch.source_for("models/llamagen/vq_ds16_t2i.pt").hub == "peizesun/llamagen_t2i"
    assert fetch.source_for("clip-vit-l-14/open_clip_pytorch_model.bin").open_clip == "ViT-L-14/openai"


def test_http_and_private_addresses_are_refused_unless_allowed_by_name(tmp_path):
    with FileServer({"/aes.pth": WEIGHTS}) as server:
        url = f"{server.base}/aes.pth"
        with pytest.raises(fetch.FetchError, match=r"refused \(bad_scheme\)"):
            fetch.download_url(url, str(tmp_path / "a.pth"))
        with pytest.raises(fetch.FetchError, match=r"refused \(blocked_loopback\)"):
            fetch.download_url(url, str(tmp_path / "a.pth"), policy=fetch.url_policy(allow_http=True))
        assert server.requests == []  # refused before any connection
        # Through the config: the entry that allows its mirror is fetched, the other is refused.
        cfg = _config(tmp_path, {"aes.pth": {"url": url, "sha256": sha(WEIGHTS), **LOCAL_MIRROR},
                                 "wm.pt": {"url": f"{server.base}/wm.pt", "sha256": sha(WEIGHTS), "allow_http": True}},
                      aesthetic={"weights": "aes.pth"}, watermark={"source": "compute", "weights": "wm.pt"})
        with pytest.raises(fetch.FetchError, match=r"filters.watermark.weights: 'wm.pt': .*blocked_loopback"):
            fetch_models(cfg)
    assert (tmp_path / "models" / "aes.pth").read_bytes() == WEIGHTS
    assert [r[0] for r in server.requests] == ["/aes.pth"]


class Redirector(FileServer):
    """Answers every request with a redirect to `target`."""

    def __init__(self, target: str):
        super().__init__({})

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server.RequestHandlerClass = Handler


@pytest.mark.parametrize("target, refusal", [
    # By name: the guard refuses it before any lookup.
    ("http://metadata.google.internal/computeMetadata/v1/", r"refused \(blocked_metadata: redirect to "),
    ("file:///etc/passwd", r"Redirection to url 'file:///etc/passwd' is not allowed"),  # urllib's own check
])
def test_every_redirect_goes_through_the_guard(tmp_path, target, refusal):
    with Redirector(target) as server:
        with pytest.raises(fetch.FetchError, match=refusal):
            fetch.download_url(f"{server.base}/x.pth", str(tmp_path / "x.pth"), policy=LOCAL)
    assert not (tmp_path / "x.pth").exists()


def test_model_source_needs_one_origin():
    with pytest.raises(ValueError, match="exactly one of url, hub, open_clip"):
        ModelSource(url="http://127.0.0.1/x", hub="a/b")
    with pytest.raises(ValueError, match="64 hex digits"):
        ModelSource(url="http://127.0.0.1/x", sha256="abc")


def test_cli_fetch_models_fetches_and_refuses_a_mismatch(tmp_path, monkeypatch, capsys):
    import yaml

    from tessera import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the command turns it off for itself; restored after
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with FileServer({"/aes.pth": WEIGHTS}) as server:
        tree = _config(tmp_path, {"aes.pth": {"url": f"{server.base}/aes.pth", "sha256": sha(WEIGHTS), **LOCAL_MIRROR}},
                       aesthetic={"weights": "aes.pth"}).model_dump(mode="json", exclude_unset=True)
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
        assert cli.main(["fetch-models", str(tmp_path / "run.yaml")]) == 0
        assert "fetched  filters.aesthetic.weights" in capsys.readouterr().out
        tree["model_sources"]["aes.pth"]["sha256"] = sha(b"other")
        tree["filters"]["aesthetic"]["weights"] = "again/aes.pth"
        tree["model_sources"]["again/aes.pth"] = tree["model_sources"].pop("aes.pth")
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
        assert cli.main(["fetch-models", "--config", str(tmp_path / "run.yaml")]) == 1
        assert "does not match the pinned" in capsys.readouterr().err
    assert not (tmp_path / "models" / "again" / "aes.pth").exists()


def test_every_built_in_url_is_pinned_or_refused_until_the_config_pins_it(tmp_path):
    unpinned = {name for name, s in fetch.KNOWN_SOURCES.items() if s.url and not s.sha256}
    assert unpinned == {"watermark_model_v1.pt", "clip_autokeras_binary_nsfw.pth"}  # no published sum found
    inception = "weights-inception-2015-12-05-6726825d.pth"
    assert fetch.source_for(inception).sha256.startswith("6726825d")  # torch hub's name carries its prefix
    cfg = _config(tmp_path, {}, watermark={"source": "compute", "weights": "watermark_model_v1.pt"})
    with pytest.raises(fetch.FetchError, match=r"no sha256 is pinned for https://github.com/LAION-AI/.*"
                       r"model_sources: \{watermark_model_v1.pt: \{sha256: <64 hex digits>\}\}"):
        fetch_models(cfg)
    assert not (tmp_path / "models").exists() or not os.listdir(tmp_path / "models")
    # A config entry with only a sha256 pins the built-in source of that name.
    pinned = fetch.source_for("heads/watermark_model_v1.pt", {"watermark_model_v1.pt": ModelSource(sha256=sha(WEIGHTS))})
    assert pinned.url == fetch.KNOWN_SOURCES["watermark_model_v1.pt"].url and pinned.sha256 == sha(WEIGHTS)
    assert fetch.source_for("mine.pt", {"mine.pt": ModelSource(sha256=sha(WEIGHTS))}) is None  # nothing to pin
    with pytest.raises(ValueError, match="exactly one of url, hub, open_clip, or only a sha256"):
        ModelSource(file="x.pt")


class FakeHub(FileServer):
    """A hub endpoint on loopback: every file of every repo redirects to `target`, as the hub
    redirects LFS files to its storage, with the headers huggingface_hub reads."""

    def __init__(self, target: str, size: int):
        super().__init__({})

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("X-Repo-Commit", "a" * 40)
                self.send_header("X-Linked-Etag", '"' + "b" * 64 + '"')
                self.send_header("X-Linked-Size", str(size))
                self.send_header("Content-Length", "0")
                self.end_headers()
                outer_requests.append(self.path)

            do_GET = do_HEAD

        outer_requests = self.requests
        self.server.RequestHandlerClass = Handler


@pytest.fixture
def hub_online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def point_at(base: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", base)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", base + "/{repo_id}/resolve/{revision}/{filename}")
    return point_at


def test_hub_downloads_go_through_the_guard_at_every_redirect(tmp_path, hub_online):
    from huggingface_hub import hf_hub_download


    loopback_only = fetch.url_policy(allow_http=True).model_copy(update={"allow_loopback": True})
    with FakeHub("http://10.255.255.1/w.pth", len(WEIGHTS)) as hub:
        hub_online(hub.base)
        with hub_guard(loopback_only), pytest.raises(BlockedAddress, match=r"blocked_private: request to "
                                                                          r"http://10.255.255.1/w.pth"):
            hf_hub_download("org/model", "w.pth", local_dir=str(tmp_path / "a"))
        assert "/org/model/resolve/main/w.pth" in hub.requests  # the hub was asked; the redirect was not followed
    # Through fetch-models: refused unless the model's entry allows the private mirror; metadata never.
    with FileServer({"/w.pth": WEIGHTS}) as mirror, FakeHub(f"{mirror.base}/w.pth", len(WEIGHTS)) as hub:
        hub_online(hub.base)
        with pytest.raises(fetch.FetchError, match=r"org/model/w.pth: refused \(bad_scheme: request to http://127"):
            fetch.fetch("w.pth", ModelSource(hub="org/model", file="w.pth"), str(tmp_path / "models"))
        with pytest.raises(fetch.FetchError, match=r"refused \(blocked_loopback: request to http://127"):
            fetch.fetch("w.pth", ModelSource(hub="org/model", file="w.pth", allow_http=True), str(tmp_path / "models"))
        assert mirror.requests == []
        row = fetch.fetch("w.pth", ModelSource(hub="org/model", file="w.pth", sha256=sha(WEIGHTS), **LOCAL_MIRROR),
                          str(tmp_path / "models"))
        assert row["action"] == "fetched" and (tmp_path / "models" / "w.pth").read_bytes() == WEIGHTS
        assert [r[0] for r in mirror.requests] == ["/w.pth"]
    with FakeHub("http://169.254.169.254/latest/meta-data/w.pth", len(WEIGHTS)) as hub:
        hub_online(hub.base)
        with pytest.raises(fetch.FetchError, match=r"refused \(blocked_metadata: request to http://169.254.169.254/"):
            fetch.fetch("m.pth", ModelSource(hub="org/model", file="m.pth", **LOCAL_MIRROR), str(tmp_path / "models"))
    from huggingface_hub.utils import _http

    assert _http._GLOBAL_CLIENT_FACTORY is _http.default_client_factory  # the guard is undone after each fetch


def test_cli_pins_a_sum_by_name(tmp_path, monkeypatch, capsys):
    import yaml

    from tessera import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    with FileServer({"/aes.pth": WEIGHTS}) as server:
        tree = _config(tmp_path, {"aes.pth": {"url": f"{server.base}/aes.pth", **LOCAL_MIRROR}},
                       aesthetic={"weights": "aes.pth"}).model_dump(mode="json", exclude_unset=True)
        (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
        run = ["fetch-models", str(tmp_path / "run.yaml")]
        assert cli.main(run) == 1
        assert "no sha256 is pinned for http://127.0.0.1" in capsys.readouterr().err
        assert cli.main([*run, "--sha256", "aes.pth=abc"]) == 2
        assert "the sha256 must be 64 hex digits" in capsys.readouterr().err
        assert server.requests == []
        assert cli.main([*run, "--sha256", f"aes.pth={sha(WEIGHTS).upper()}"]) == 0
    assert (tmp_path / "models" / "aes.pth").read_bytes() == WEIGHTS
