"""The tokenize stage: kept samples -> WebDataset shards of VQ codes, one set per resolution.

For every selected shard (select/{shard}.done), a model actor holding the VQ tokenizer (the stage
runtime) reads the kept samples (keep true in select/{shard}.parquet) from download/{shard}.tar, joins them with
their captions (captions/, when captioned), resizes them on the short side, centre-crops them to
each resolution and encodes them. Each resolution gets tokens/{res}/{shard}.tar with, per sample:
  {key}.codes.npy       uint16 (res/16, res/16), raster order
  {key}.codes_flip.npy  the same for the horizontally flipped image (tokenize.flip)
  {key}.t5.npy          float16 caption features (L, D), no padding (tokenize.text_encoder)
  {key}.json            key, caption, caption_long, caption_short, url, hash, sha256, scores
the shard's code histogram tokens/{res}/{shard}.counts (zlib-compressed uint32 per code, a
sidecar: the marker stays small), then the marker tokens/{res}/{shard}.done with the shard's
counts and lineage: its fingerprint (the shard's selection decisions, its caption marker, the
tokenizer settings) and the selection it belongs to. tokens/{res}/manifest.json sums up every
finished shard: the selection, samples, bytes per sample, codebook usage (the histograms summed
in Ray tasks, so the driver never holds them). A re-selection redoes exactly the shards whose inputs changed.

Every kept sample ends, per resolution, tokenized or dropped with one reason: `too_small` (its
original short side is below the resolution), `corrupt_image`, `missing_from_download`.
A sample without a generated caption is still tokenized (caption_long/short null) and counted
under `no_caption`.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np

from tessera.config.ray import RayConfig
from tessera.config.tokenize import TokenizeConfig
from tessera.core import runtime
from tessera.core.funnel import DROPPED, StageResult, by_reason
from tessera.core.lineage import (
    input_shards,
    kept_counts,
    selection_id,
    shard_fingerprints,
    with_decisions,
)
from tessera.core.raytools import init_ray
from tessera.core.runtime import matches
from tessera.core.stage import Stage
from tessera.core.store import ShardStore
from tessera.core.token_shards import (
    decode_npy,
    encode_npy,
    sample_item,
    tokens_folder,
    write_token_shard,
)
from tessera.models.refs import build_of, resolve
from tessera.models.text_encoder import TextEncoder
from tessera.models.vq import CONFIG_FILE, VQ_CONFIGS, load_vq
from tessera.pipelines.intake import read_samples

log = logging.getLogger(__name__)
STAGE = "tokenize"
TOKENIZED = "tokenized"
NO_CAPTION = "no_caption"
# Columns of scores/{shard}.parquet that are lineage or selection, not scores.
NOT_SCORES = {"key", "url", "hash", "sha256", "original_width", "original_height", "keep", "reason",
              "caption", "error", "status"}


@dataclass
class TokenizeResult(StageResult):
    # res -> {"rows_in", "tokenized", "no_caption", "dropped": {reason: n}, "shards"}
    per_resolution: dict[int, dict]

    def outcomes(self) -> list[tuple[str, str, str, int]]:
        rows = []
        for res, c in sorted(self.per_resolution.items()):
            stage = f"{STAGE}_{res}"
            rows.append((stage, TOKENIZED, "", c["tokenized"] - c["no_caption"]))
            if c["no_caption"]:
                rows.append((stage, TOKENIZED, NO_CAPTION, c["no_caption"]))
            rows += by_reason(stage, DROPPED, c["dropped"])
        return rows


# Reading a shard ------------------------------------------------------------------------------
def _json_value(v):
    """A parquet cell as plain JSON: numpy scalars unwrapped, NaN and NA as None."""
    import pandas as pd

    if v is None or v is pd.NA or (isinstance(v, (float, np.floating)) and v != v):
        return None
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_shard(store: ShardStore, shard: str, text_caption: str) -> list[dict]:
    """One row per kept sample of a shard: image bytes (or why there are none) and its metadata."""
    scores = with_decisions(store, shard, store.read_table("scores", f"{shard}.parquet")).to_pandas()
    kept = scores[scores["keep"].astype(bool)]
    captions: dict[str, dict] = {}
    if store.is_done("caption", shard):
        table = store.read_table("captions", f"{shard}.parquet", columns=["key", "caption_long", "caption_short"])
        captions = {r["key"]: r for r in table.to_pylist()}
    score_cols = [c for c in scores.columns if c not in NOT_SCORES]
    members = read_samples(store, shard, set(kept["key"]))
    rows = []
    for rec in kept.to_dict("records"):
        rec = {k: _json_value(v) for k, v in rec.items()}
        key = rec["key"]
        files = members.get(key, {})
        try:
            meta = json.loads(files["json"]) if "json" in files else {}
        except ValueError:
            meta = {}
        caption = files["txt"].decode("utf-8", "replace") if "txt" in files else meta.get("caption")
        cap = captions.get(key, {})
        sample = {
            "key": key, "caption": caption,
            "caption_long": cap.get("caption_long"), "caption_short": cap.get("caption_short"),
            "url": rec.get("url") or meta.get("url"),
            "hash": rec["hash"] if rec.get("hash") is not None else _json_value(meta.get("hash")),
            "sha256": rec.get("sha256") or meta.get("sha256"),
            "scores": {c: rec[c] for c in score_cols},
        }
        width = rec.get("original_width") or meta.get("original_width") or 0
        height = rec.get("original_height") or meta.get("original_height") or 0
        rows.append({
            "key": key, "image": files.get("jpg") or files.get("png") or files.get("webp") or b"",
            "missing": "jpg" not in files and "png" not in files and "webp" not in files,
            "short_side": int(min(width, height)) if width and height else 0,
            "meta": json.dumps(sample), "text": sample[text_caption] or caption or "",
            "captioned": bool(cap.get("caption_long")),
        })
    return rows


# Preparing pixels ----------------------------------------------------------------------------
def centre_crop(img, size: int):
    """Resize the short side to `size` (bicubic) and crop the centre square, as LlamaGen does."""
    from PIL import Image

    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC,
                     reducing_gap=None if scale > 0.5 else 2.0)
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def prepare_batch(batch: dict, resolutions: list[int]) -> dict:
    """Decode the images and cut each into every resolution it is large enough for."""
    from PIL import Image

    n = len(batch["key"])
    out = {k: batch[k] for k in ("key", "meta", "text", "captioned")}
    pixels = {r: [b""] * n for r in resolutions}
    reasons = {r: [""] * n for r in resolutions}
    for i in range(n):
        if batch["missing"][i]:
            for r in resolutions:
                reasons[r][i] = "missing_from_download"
            continue
        try:
            with Image.open(io.BytesIO(batch["image"][i])) as im:
                img = im.convert("RGB")
        except Exception:  # noqa: BLE001 - any undecodable image is one dropped sample
            for r in resolutions:
                reasons[r][i] = "corrupt_image"
            continue
        short = int(batch["short_side"][i]) or min(img.size)
        for r in resolutions:
            if short < r:
                reasons[r][i] = "too_small"
            else:
                pixels[r][i] = np.asarray(centre_crop(img, r), dtype=np.uint8).tobytes()
    for r in resolutions:
        out[f"pixels_{r}"] = np.array(pixels[r], dtype=object)
        out[f"reason_{r}"] = np.array(reasons[r], dtype=object)
    return out


# Encoding ------------------------------------------------------------------------------------
class TokenizeShard:
    """A model actor's work: holds the VQ tokenizer (and the text encoder) on one device, and
    tokenizes the kept samples of one shard per call at every resolution still to do."""

    def __init__(self, cfg: TokenizeConfig, vq_path: str, text_path: str | None, device: str,
                 codebook_size: int, fingerprints: dict[str, str], selection: str):

        self.cfg, self.device, self.codebook_size = cfg, device, codebook_size
        self.fingerprints, self.selection = fingerprints, selection
        # A folder (tiny:vq) carries its own config; a bare LlamaGen file is named by vq_config.
        config = None if os.path.isdir(vq_path) else cfg.vq_config
        self.vq = load_vq(vq_path, config, device=device, ema=cfg.vq_ema)
        self.text = None
        if text_path:
            import torch


            self.text = TextEncoder.from_pretrained(text_path, cfg.text_max_length, device=device,
                                                    dtype=torch.bfloat16 if device == "cuda" else None,
                                                    clean=cfg.caption_clean)

    def _encode(self, crops: list[bytes], res: int) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.frombuffer(b"".join(crops), dtype=np.uint8).reshape(len(crops), res, res, 3).copy())
        x = x.to(self.device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return self.vq.encode(x).cpu().numpy().astype(np.uint16)

    def __call__(self, store: ShardStore, shard: str) -> dict:
        from concurrent.futures import ThreadPoolExecutor

        fingerprint = self.fingerprints[shard]
        done = {r: store.marker_info(tokens_folder(r), shard) for r in self.cfg.resolutions}
        todo = [r for r in self.cfg.resolutions if not matches(done[r], fingerprint)]
        encoded: list[dict] = []
        if todo:  # a resolution finished before a crash is not encoded again
            rows = read_shard(store, shard, self.cfg.text_caption)
            size = self.cfg.batch_size
            chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
            with ThreadPoolExecutor(max_workers=2) as pool:  # crops of the next batch while this one encodes
                for batch in pool.map(lambda c: prepare_batch(_columns(c), todo), chunks):
                    out = self.encode(batch, todo)
                    encoded += [{k: v[i] for k, v in out.items()} for i in range(len(out["key"]))]
        summary = {}
        for res in self.cfg.resolutions:
            if res in todo:
                summary[str(res)] = write_shard(store, shard, res, encoded, self.codebook_size,
                                                {"fingerprint": fingerprint, "selection": self.selection})
            else:
                summary[str(res)] = {k: done[res][k] for k in SUMMARY}
        return {"rows_in": summary[str(self.cfg.resolutions[0])]["rows_in"], **summary}

    def encode(self, batch: dict, resolutions: list[int]) -> dict:
        n = len(batch["key"])
        out = {k: batch[k] for k in ("key", "meta", "captioned")}
        for r in resolutions:
            ok = [i for i in range(n) if batch[f"reason_{r}"][i] == ""]
            codes, flips = [b""] * n, [b""] * n
            if ok:
                crops = [batch[f"pixels_{r}"][i] for i in ok]
                for i, c in zip(ok, self._encode(crops, r)):
                    codes[i] = encode_npy(c)
                if self.cfg.flip:
                    flipped = [np.frombuffer(c, np.uint8).reshape(r, r, 3)[:, ::-1].tobytes() for c in crops]
                    for i, c in zip(ok, self._encode(flipped, r)):
                        flips[i] = encode_npy(c)
            out[f"reason_{r}"] = batch[f"reason_{r}"]
            out[f"codes_{r}"] = np.array(codes, dtype=object)
            out[f"codes_flip_{r}"] = np.array(flips, dtype=object)
        feats = [b""] * n
        if self.text is not None:
            usable = [i for i in range(n) if any(batch[f"reason_{r}"][i] == "" for r in resolutions)]
            if usable:
                for i, f in zip(usable, self.text.encode([str(batch["text"][i]) for i in usable])):
                    feats[i] = encode_npy(f.numpy().astype(np.float16))
        out["t5"] = np.array(feats, dtype=object)
        return out


# Writing a shard ------------------------------------------------------------------------------
COUNTS = ".counts"  # tokens/{res}/{shard}.counts: the shard's code histogram
SUMMARY = ("rows_in", "tokenized", "no_caption", "dropped", "bytes")  # a resolution's part of the stage marker
COUNTS_BATCH = 500  # histograms summed per task


def pack_counts(counts: np.ndarray) -> bytes:
    return zlib.compress(counts.astype(np.uint32).tobytes())


def unpack_counts(packed: bytes) -> np.ndarray:
    return np.frombuffer(zlib.decompress(packed), dtype=np.uint32)


def write_counts(store: ShardStore, res: int, shard: str, counts: np.ndarray) -> None:
    store.write_bytes(pack_counts(counts), tokens_folder(res), shard + COUNTS)


def _sum_counts(store: ShardStore, first: str, folder: str, shards: list[str]) -> np.ndarray:
    """One task: the summed histograms of these shards, read in one batched fetch."""
    paths = [store.path(folder, s + COUNTS) for s in shards]
    blobs = store.fs.cat(paths, on_error="omit")
    missing = [s for s, p in zip(shards, paths) if p not in blobs]
    if missing:
        raise FileNotFoundError(f"{store.url(folder)}: no code histogram ({COUNTS}) for shard(s) "
                                f"{', '.join(missing[:5])}; remove their markers and tokenize again")
    total = None
    for path in paths:
        c = unpack_counts(blobs[path]).astype(np.int64)
        total = c if total is None else total + c
    return total


def code_counts(store: ShardStore, res: int, shards: list[str]) -> np.ndarray | None:
    """The code histogram summed over these shards (None for none), in Ray tasks of COUNTS_BATCH."""
    batches = {shards[i]: shards[i:i + COUNTS_BATCH] for i in range(0, len(shards), COUNTS_BATCH)}
    sums: list[np.ndarray] = []
    runtime.map_shards(f"tokens/{res}:counts", store, list(batches), _sum_counts, kwargs={"folder": tokens_folder(res)},
                       shard_kwargs=lambda first: {"shards": batches[first]}, fold=lambda _, c: sums.append(c))
    return np.sum(sums, axis=0) if sums else None


def _columns(rows: list[dict]) -> dict:
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


def write_shard(store: ShardStore, shard: str, res: int, rows: list[dict], codebook_size: int,
                lineage: dict) -> dict:
    """Write tokens/{res}/{shard}.tar from the shard's encoded rows (sorted by key), then its marker
    (the shard's counts and its lineage: fingerprint and selection); returns the counts."""
    dropped: Counter = Counter()
    counts = np.zeros(codebook_size, dtype=np.int64)
    items, no_caption = [], 0
    for row in sorted(rows, key=lambda r: r["key"]):
        if row[f"reason_{res}"]:
            dropped[row[f"reason_{res}"]] += 1
            continue
        items.append(sample_item(row["key"], row[f"codes_{res}"], row["meta"].encode(),
                                 codes_flip=row[f"codes_flip_{res}"], features=row["t5"]))
        counts += np.bincount(decode_npy(row[f"codes_{res}"]).ravel(), minlength=codebook_size)
        no_caption += not row["captioned"]
    info = {"rows_in": len(rows), "tokenized": len(items), "no_caption": no_caption, "dropped": dict(dropped)}
    write_counts(store, res, shard, counts)
    size = write_token_shard(store, res, shard, items, {**info, **lineage})
    return {**info, "bytes": size}  # SUMMARY's fields


def lineage(cfg: TokenizeConfig, vq_path: str, text_path: str | None) -> str:
    """What decides a shard's codes besides its selection and captions (resolutions are per marker)."""
    settings = cfg.model_dump(mode="json", include={"vq", "vq_config", "vq_ema", "flip", "text_encoder",
                                                    "text_max_length", "text_caption", "caption_clean"})

    blob = json.dumps({"settings": settings, "vq": vq_path, "text": text_path,
                       "builds": [build_of(vq_path), build_of(text_path)]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run(cfg: TokenizeConfig, ray_cfg: RayConfig, store: ShardStore, models_root: str,
        on_shard=None) -> TokenizeResult:
    """Tokenize every selected shard not yet done for its current selection and captions at every
    resolution; return counts over all shards."""

    shards = input_shards(store)
    if not shards:
        raise ValueError(f"{store.root}: no selected shards to tokenize (run score and select first)")
    vq_path = resolve(cfg.vq, models_root)
    text_path = resolve(cfg.text_encoder, models_root) if cfg.text_encoder else None
    fingerprints = shard_fingerprints(store, shards, lineage(cfg, vq_path, text_path), upstream=("caption",))
    selection = selection_id(store)
    # One resolution's markers at a time: which shards are not whole at every resolution (one
    # added, or removed by hand), and which carry an older selection (restamped if kept below).
    unfinished, other_selection = set(), {}
    for res in cfg.resolutions:
        markers = store.markers(tokens_folder(res), fields=("fingerprint", "selection"))
        unfinished.update(s for s in shards if not matches(markers.get(s), fingerprints[s]))
        other_selection[res] = [s for s in shards if s in markers and markers[s].get("selection") != selection]
        del markers
    for shard in unfinished & set(store.done_shards(STAGE)):
        store.fs.rm(store.path(*store.marker(STAGE, shard)))
    init_ray(ray_cfg)
    device = "cuda" if cfg.num_gpus_per_actor > 0 else "cpu"
    ran = runtime.run_stage(
        STEP.name, store, shards, STEP.work,
        kwargs={"cfg": cfg, "vq_path": vq_path, "text_path": text_path, "device": device,
                "codebook_size": _codebook_size(vq_path, cfg), "fingerprints": fingerprints, "selection": selection},
        fingerprints=fingerprints, stamp={"selection": selection}, num_cpus=cfg.num_cpus_per_actor,
        num_gpus=cfg.num_gpus_per_actor, actors=cfg.num_actors, retries=cfg.shard_retries,
        outputs=tuple(STEP.folders(STEP.outputs, cfg.resolutions)), on_shard=on_shard)
    for res, older in other_selection.items():  # shards kept as they were, but now part of this selection
        stale = [s for s in older if s not in ran.done and s not in ran.failed]
        runtime.restamp(store, tokens_folder(res), stale, {"selection": selection}, retries=cfg.shard_retries)
    result = summarize(store, shards, cfg.resolutions, ran.failed)
    for res in cfg.resolutions:
        write_manifest(store, res, shards, cfg, selection)
    return result


def _codebook_size(vq_path: str, cfg: TokenizeConfig) -> int:
    if os.path.isdir(vq_path) and os.path.exists(os.path.join(vq_path, CONFIG_FILE)):
        with open(os.path.join(vq_path, CONFIG_FILE)) as f:
            return int(json.load(f)["codebook_size"])
    return VQ_CONFIGS[cfg.vq_config].codebook_size


STEP = Stage(STAGE, inputs=("download", "select", "captions"), outputs=("tokens/{res}",), work=TokenizeShard,
             result=TokenizeResult, marked_in_outputs=True)


def summarize(store: ShardStore, shards: list[str], resolutions: list[int], failed: dict[str, str]) -> TokenizeResult:
    per: dict[int, dict] = {}
    lost = kept_counts(store, failed)
    for res in resolutions:
        markers = store.markers(tokens_folder(res), fields=("rows_in", "tokenized", "no_caption", "dropped"))
        infos = [markers[s] for s in shards if s not in failed]
        dropped: Counter = Counter()
        for info in infos:
            dropped.update(info["dropped"])
        per[res] = {"rows_in": sum(i["rows_in"] for i in infos), "tokenized": sum(i["tokenized"] for i in infos),
                    "no_caption": sum(i["no_caption"] for i in infos), "dropped": dict(dropped),
                    "shards": len(infos)}
        per[res]["rows_in"] += lost
    return TokenizeResult(per, failed=failed, failed_rows=lost)


def write_manifest(store: ShardStore, res: int, shards: list[str], cfg: TokenizeConfig, selection: str) -> dict:
    """tokens/{res}/manifest.json: the selection, shards, sample counts, bytes per sample, codebook usage."""
    folder = tokens_folder(res)
    markers = store.markers(folder, fields=("tokenized", "dropped", "bytes"))
    infos = {s: markers[s] for s in shards if s in markers}
    counts = code_counts(store, res, list(infos))
    samples = sum(i["tokenized"] for i in infos.values())
    total = int(counts.sum()) if counts is not None else 0
    p = counts[counts > 0] / total if total else np.zeros(0)
    manifest = {
        "resolution": res, "grid": [res // 16, res // 16], "selection": selection, "vq": cfg.vq, "flip": cfg.flip,
        "text_encoder": cfg.text_encoder, "text_caption": cfg.text_caption if cfg.text_encoder else None,
        "samples": samples,
        "dropped": dict(sum((Counter(i["dropped"]) for i in infos.values()), Counter())),
        "bytes": sum(i["bytes"] for i in infos.values()),
        "bytes_per_sample": round(sum(i["bytes"] for i in infos.values()) / samples, 1) if samples else None,
        "codebook_size": int(len(counts)) if counts is not None else None,
        "codes_used": int((counts > 0).sum()) if counts is not None else 0,
        "codebook_usage": round(float((counts > 0).mean()), 4) if counts is not None else 0.0,
        # Entropy of the code distribution: the loss of a model that knows only code frequencies.
        "code_entropy_nats": round(float(-(p * np.log(p)).sum()), 4) if total else None,
        "shards": {s: {"samples": i["tokenized"], "bytes": i["bytes"]} for s, i in infos.items()},
    }
    store.write_json(manifest, folder, "manifest.json")
    return manifest
