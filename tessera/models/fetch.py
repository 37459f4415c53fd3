"""Real weights, fetched once into models_root and found there offline.

A config names each model as a path (relative ones are under models_root), a file name, or a
Hugging Face hub id. `fetch(source, target)` downloads one model to `target` under models_root:
a URL (https only unless its source allows http, from public addresses only unless it allows a
private mirror, through the URL guard at every connection and redirect; resumed from a `.part` file
with an HTTP Range request, checked against its pinned sha256, renamed into place only when it
matches), a hub repo or one file of it (huggingface_hub, which
resumes by itself), or an open_clip pretrained tag. `locate(ref, models_root)` is what a run uses:
the model's place under models_root, else a clear error naming the model and the command that
fetches it. Nothing here downloads during a run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import urllib.error
import urllib.request
import zipfile
from contextlib import contextmanager

from tessera.config.download import UrlPolicy
from tessera.config.models import ModelSource
from tessera.core.urlcheck import BlockedAddress, check_url, make_opener
from tessera.models.cache import cache_root, cached_copy, is_remote
from tessera.models.hubguard import hub_guard

log = logging.getLogger(__name__)

FETCH_COMMAND = "tessera fetch-models CONFIG (or: make fetch-models CONFIG=...)"
SNAPSHOT_MARKER = ".fetched.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Models the shipped configs name, by the name as written (or its file name).
KNOWN_SOURCES: dict[str, ModelSource] = {
    "sac+logos+ava1-l14-linearMSE.pth": ModelSource(
        url="https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth",
        sha256="21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"),
    # No published checksum for these two: fetch-models refuses them until the config pins one
    # (`model_sources: {NAME: {sha256: ...}}`, see NO_PUBLISHED_SUM).
    "watermark_model_v1.pt": ModelSource(
        url="https://github.com/LAION-AI/LAION-5B-WatermarkDetection/raw/main/models/watermark_model_v1.pt"),
    "clip_autokeras_binary_nsfw.pth": ModelSource(
        url="https://github.com/LAION-AI/CLIP-based-NSFW-Detector/files/10250461/clip_autokeras_binary_nsfw.zip",
        member="clip_autokeras_binary_nsfw.pth"),
    "clip-vit-l-14/open_clip_pytorch_model.bin": ModelSource(open_clip="ViT-L-14/openai"),
    # OpenAI's ViT-B/32: the CLIP the llamagen_t2i evaluation protocol scores with.
    "clip-vit-b-32/open_clip_pytorch_model.bin": ModelSource(open_clip="ViT-B-32/openai"),
    # The Inception-v3 weights torch-fidelity and torchmetrics load for FID (the eval section), the
    # same file as pytorch-fid's pt_inception-2015-12-05-6726825d.pth (95,628,359 bytes; torch hub
    # names end in the first 8 hex digits of the sha256).
    "weights-inception-2015-12-05-6726825d.pth": ModelSource(
        url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"),
    "vq_ds16_t2i.pt": ModelSource(hub="peizesun/llamagen_t2i", file="vq_ds16_t2i.pt"),
    "t2i_XL_stage1_256.pt": ModelSource(hub="peizesun/llamagen_t2i", file="t2i_XL_stage1_256.pt"),
    "t2i_XL_stage2_512.pt": ModelSource(hub="peizesun/llamagen_t2i", file="t2i_XL_stage2_512.pt"),
}


NO_PUBLISHED_SUM = ("no sha256 is pinned for {url}, and every download is checked against one: take the "
                    "sha256 of a copy you trust and pin it in the config, `model_sources: {{{name}: {{sha256: "
                    "<64 hex digits>}}}}`, or with `tessera fetch-models CONFIG --sha256 {name}=<64 hex digits>`")


class FetchError(RuntimeError):
    """A model could not be fetched, or what was fetched is not what was pinned."""


class ModelMissing(FileNotFoundError):
    def __init__(self, ref: str, models_root: str, detail: str = ""):
        root = models_root if is_remote(models_root) else os.path.abspath(models_root)
        where = "does not exist" if os.path.isabs(ref) else f"is not in models_root ({root})"
        super().__init__(f"model {ref!r} {where}{detail}: fetch it with `{FETCH_COMMAND}`")


def is_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and not os.path.splitext(ref)[1].lower() in (".pt", ".pth", ".bin", ".safetensors")


def target_path(ref: str, models_root: str) -> str:
    """Where the model named `ref` lives: relative names under models_root."""
    return ref if os.path.isabs(ref) else os.path.join(models_root, ref)


def _lookup(ref: str, table: dict[str, ModelSource]) -> ModelSource | None:
    for name in (ref, os.path.basename(ref)):
        if name in table:
            return table[name]
    return None


def source_for(ref: str, sources: dict[str, ModelSource] | None = None) -> ModelSource | None:
    """The source of `ref`: the config's by name, the built-in by name or file name, a hub id's repo.
    A config entry with only a sha256 pins the built-in source of that name."""
    mine, builtin = _lookup(ref, sources or {}), _lookup(ref, KNOWN_SOURCES)
    if mine is not None and mine.pins_only:
        return builtin.model_copy(update={"sha256": mine.sha256}) if builtin is not None else None
    if mine is not None or builtin is not None:
        return mine or builtin
    return ModelSource(hub=ref) if is_hub_id(ref) else None


# Resolution at run time ---------------------------------------------------------------------------
def locate(ref: str, models_root: str) -> str:
    """The local path of a model a config names. Never downloads from the internet (a models_root on
    object storage is read through the local model cache, tessera.models.cache)."""
    if "://" in ref:
        return ref
    if is_remote(models_root) and not os.path.isabs(ref):
        # An object-store models_root: the model is copied into the local cache (again only when it changed).
        local = cached_copy(posixpath.join(models_root.rstrip("/"), ref), target_path(ref, cache_root(models_root)))
        if local is None:
            raise ModelMissing(ref, models_root)
        models_root = cache_root(models_root)
    path = target_path(ref, models_root)
    if os.path.exists(path):
        if os.path.isdir(os.path.join(path, ".cache", "huggingface")) and not os.path.exists(
                os.path.join(path, SNAPSHOT_MARKER)):
            raise ModelMissing(ref, models_root, " completely (an interrupted fetch)")
        return path
    if not os.path.isabs(ref) and os.path.exists(ref):  # relative to the working directory
        return ref
    if is_hub_id(ref):  # a hub cache filled by other means
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(ref, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached: the error below says what to do
            pass
    raise ModelMissing(ref, models_root)


# Downloads -------------------------------------------------------------------------------------
def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def url_policy(allow_http: bool = False, allow_private: bool = False) -> UrlPolicy:
    """What a model download may reach: https (and http when allowed) on public addresses (and
    loopback and private ones when allowed); never link-local or metadata addresses."""
    return UrlPolicy(schemes=["https", "http"] if allow_http else ["https"],
                     allow_loopback=allow_private, allow_private=allow_private)


def download_url(url: str, dest: str, sha256: str | None = None, timeout: float = 60.0,
                 policy: UrlPolicy | None = None) -> str:
    """Download `url` to `dest` through `dest.part`, resuming a partial one with a Range request,
    through the URL guard under `policy` (by default https to public addresses only). `timeout`
    bounds each connect and read. With `sha256`, a mismatch deletes the download and raises.
    Returns the file's sha256."""
    policy = policy or url_policy()
    refused = check_url(url, policy)
    if refused:
        raise FetchError(f"{url}: refused ({refused}); a model is fetched over https from a public address "
                         "unless its model_sources entry sets allow_http or allow_private")
    part = f"{dest}.part"
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    have = os.path.getsize(part) if os.path.exists(part) else 0
    headers = {"User-Agent": "tessera-fetch-models"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        opener = make_opener(policy, whole_deadline=False)
        with opener.open(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            resumed = have and resp.status == 206 and (resp.headers.get("Content-Range") or "").startswith(
                f"bytes {have}-")
            if have and not resumed:
                log.info("%s: the server does not resume; downloading from the start.", url)
            with open(part, "ab" if resumed else "wb") as out:
                shutil.copyfileobj(resp, out, 1 << 20)
    except urllib.error.HTTPError as e:
        if not (have and e.code == 416):  # 416: nothing left to fetch past what we have
            raise FetchError(f"{url}: HTTP {e.code} {e.reason}") from None
    except BlockedAddress as e:
        raise FetchError(f"{url}: refused ({e}); a model is fetched over https from a public address unless "
                         "its model_sources entry sets allow_http or allow_private") from None
    except (urllib.error.URLError, OSError) as e:
        raise FetchError(f"{url}: {e} (rerun to resume from {os.path.getsize(part) if os.path.exists(part) else 0} "
                         "bytes)") from None
    got = sha256_of(part)
    if sha256 and got != sha256.lower():
        os.remove(part)
        raise FetchError(f"{url}: sha256 {got} does not match the pinned {sha256}; the download was deleted")
    os.replace(part, dest)
    return got


def _from_zip(source: ModelSource, target: str) -> str:
    archive = f"{target}.zip"
    got = download_url(source.url, archive, source.sha256, policy=url_policy(source.allow_http, source.allow_private))
    with zipfile.ZipFile(archive) as z:
        names = [n for n in z.namelist() if os.path.basename(n) == source.member]
        if not names:
            raise FetchError(f"{source.url}: no {source.member} in the archive (it has {z.namelist()[:10]})")
        with z.open(names[0]) as src, open(f"{target}.part", "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    os.replace(f"{target}.part", target)
    os.remove(archive)
    return got


def _hub_file(repo: str, filename: str, revision: str | None, target: str, sha256: str | None,
              policy: UrlPolicy | None = None) -> str:
    from huggingface_hub import hf_hub_download

    folder = os.path.dirname(os.path.abspath(target))
    with _guarded(f"{repo}/{filename}", policy or url_policy()):
        path = hf_hub_download(repo, filename, revision=revision, local_dir=folder)
    if os.path.abspath(path) != os.path.abspath(target):
        os.replace(path, target)
    got = sha256_of(target)
    if sha256 and got != sha256.lower():
        os.remove(target)
        raise FetchError(f"{repo}/{filename}: sha256 {got} does not match the pinned {sha256}; deleted")
    return got


@contextmanager
def _guarded(what: str, policy: UrlPolicy):
    """huggingface_hub's requests inside the block go through the URL guard under `policy`."""
    try:
        with hub_guard(policy):
            yield
    except BlockedAddress as e:
        raise FetchError(f"{what}: refused ({e}); a hub model is fetched over https from a public address "
                         "unless its model_sources entry sets allow_http or allow_private") from None


def _open_clip(tag: str, target: str, sha256: str | None) -> str:
    import open_clip

    arch, name = tag.split("/", 1)
    cfg = open_clip.get_pretrained_cfg(arch, name)
    if not cfg:
        raise FetchError(f"open_clip has no pretrained weights {name!r} for {arch!r}")
    if cfg.get("hf_hub"):
        repo = cfg["hf_hub"].rstrip("/")
        return _hub_file(repo, "open_clip_pytorch_model.bin", None, target, sha256)
    url = cfg["url"]
    # OpenAI's URLs carry the file's sha256 as their second-to-last part.
    pinned = sha256 or (url.split("/")[-2] if "openaipublic" in url else None)
    return download_url(url, target, pinned)


def fetch(ref: str, source: ModelSource, models_root: str) -> dict:
    """Fetch one model into models_root (skipped when present). Returns what was done."""
    target = target_path(ref, models_root)
    snapshot = bool(source.hub and not source.file)
    done = os.path.exists(os.path.join(target, SNAPSHOT_MARKER)) if snapshot else os.path.isfile(target)
    if done:
        # (a .zip's sha256 is the archive's, which is not kept)
        if source.sha256 and not snapshot and not source.member and sha256_of(target) != source.sha256.lower():
            raise FetchError(f"{target} is there but its sha256 is {sha256_of(target)}, not the pinned "
                             f"{source.sha256}; delete it to fetch it again")
        return {"ref": ref, "path": target, "action": "present"}
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    policy = url_policy(source.allow_http, source.allow_private)
    if source.url and not source.sha256:
        raise FetchError(NO_PUBLISHED_SUM.format(url=source.url, name=os.path.basename(ref)))
    if snapshot:
        from huggingface_hub import snapshot_download

        with _guarded(source.hub, policy):
            snapshot_download(source.hub, revision=source.revision, local_dir=target)
        with open(os.path.join(target, SNAPSHOT_MARKER), "w") as f:
            json.dump({"hub": source.hub, "revision": source.revision}, f)
        return {"ref": ref, "path": target, "action": "fetched", "from": f"hub {source.hub}"}
    if source.url and source.member:
        got, origin = _from_zip(source, target), source.url
    elif source.url:
        got, origin = download_url(source.url, target, source.sha256, policy=policy), source.url
    elif source.hub:
        got, origin = _hub_file(source.hub, source.file, source.revision, target, source.sha256, policy), \
            f"hub {source.hub}/{source.file}"
    else:
        got, origin = _open_clip(source.open_clip, target, source.sha256), f"open_clip {source.open_clip}"
    if not source.sha256:
        log.warning("%s: no sha256 pinned; fetched one with sha256 %s (pin it in model_sources).", ref, got)
    return {"ref": ref, "path": target, "action": "fetched", "from": origin, "sha256": got,
            "verified": bool(source.sha256)}
