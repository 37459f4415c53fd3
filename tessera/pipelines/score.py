"""The score stage: every downloaded sample gets every score, in one pass.

One model actor per replica (the stage runtime) scores one download shard at a time: it reads
the tar, decodes each image once (in threads, ahead of the models), runs one CLIP image pass
whose embedding feeds the CLIP score, aesthetic, NSFW and near-duplicate search (the watermark
detector takes the same decoded image), and writes scores/{shard}.parquet and
embeddings/{shard}.npy; the runtime writes the marker score/{shard}.done last.

Nothing is dropped here: an unreadable image gets `error` set and NaN model scores, and the
select stage turns scores into keep or drop. Scores the input already carries (similarity,
pwatermark, punsafe, aesthetic) can be read instead of computed (`source: metadata`).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tessera.config.filters import FiltersConfig
from tessera.config.ray import RayConfig
from tessera.core import runtime
from tessera.core.funnel import StageResult
from tessera.core.raytools import init_ray
from tessera.core.stage import Stage
from tessera.core.store import ShardStore
from tessera.filters import (
    Batch,
    Needs,
    ThresholdFilter,
    build_filters,
    resolve_sources,
)
from tessera.models import refs
from tessera.models.aesthetic import load_aesthetic
from tessera.models.clip import Clip, preprocess_for
from tessera.models.nsfw import load_nsfw
from tessera.models.refs import build_of
from tessera.models.watermark import load_watermark
from tessera.models.watermark import preprocess as watermark_preprocess
from tessera.models.weights import weights_file
from tessera.pipelines.intake import read_samples

log = logging.getLogger(__name__)
STAGE = "score"
SCORES = "scores"
EMBEDDINGS = "embeddings"
# Carried from each sample's img2dataset metadata into scores/{shard}.parquet.
LINEAGE = ("url", "hash", "sha256", "original_width", "original_height")


@dataclass
class ScoreResult(StageResult):
    samples: int
    unreadable: dict[str, int]
    shards: int
    sources: dict[str, dict] = field(default_factory=dict)

    def outcomes(self) -> list[tuple[str, str, str, int]]:
        # Nothing is dropped while scoring; unreadable images are dropped by select, with a reason.
        return [(STAGE, "scored", "", self.samples)]



# Models ----------------------------------------------------------------------------------------
def model_path(ref: str, models_root: str) -> str:
    """A config's model reference as a local path: `tiny:NAME` is built, relative paths are under models_root."""

    return refs.resolve(ref, models_root)


def needs_clip(cfg: FiltersConfig, sources: dict[str, dict]) -> bool:
    return any(Needs.IMAGE_EMBEDDING in f.needs or Needs.TEXT_EMBEDDING in f.needs
               for f in build_filters(cfg, sources))


def model_paths(cfg: FiltersConfig, sources: dict[str, dict], models_root: str) -> dict[str, str]:
    """Local paths of the models this run computes with; a missing file is a clear error now."""

    paths = {}
    if needs_clip(cfg, sources):
        try:
            paths["clip"] = model_path(cfg.clip.checkpoint, models_root)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"filters.clip.checkpoint: {e}") from None
    for name in ("aesthetic", "nsfw", "watermark"):
        if sources.get(name, {}).get("source") == "compute":
            ref = getattr(cfg, name).weights
            if not ref:
                raise ValueError(f"filters.{name}: computing the score needs `weights`")
            try:
                paths[name] = weights_file(model_path(ref, models_root))
            except FileNotFoundError as e:
                raise FileNotFoundError(f"filters.{name}.weights: {e}") from None
    return paths


class BatchScorer:
    """Loads the models once and scores batches of decoded samples (no Ray in here)."""

    def __init__(self, cfg: FiltersConfig, sources: dict[str, dict], paths: dict[str, str], device: str = "cpu"):
        self.device = device
        self.clip = None
        if "clip" in paths:
            self.clip = Clip(cfg.clip.model, paths["clip"], device, cfg.clip.force_quick_gelu, cfg.precision)
        models: dict = {"autocast": cfg.precision == "bf16" and device.startswith("cuda")}
        for name, load in (("aesthetic", load_aesthetic), ("nsfw", load_nsfw)):
            if name in paths:
                head = load(paths[name]).to(device)
                if self.clip is not None and head.embed_dim != self.clip.embed_dim:
                    raise ValueError(f"filters.{name}: the head takes {head.embed_dim}-d embeddings but "
                                     f"{cfg.clip.model} gives {self.clip.embed_dim}-d ones")
                models[name] = head
        if "watermark" in paths:
            models["watermark"] = load_watermark(paths["watermark"], cfg.watermark.arch).to(device)
        self.filters = build_filters(cfg, sources, models)
        self.needs = Needs.METADATA
        for f in self.filters:
            self.needs |= f.needs
        self.watermark_size = cfg.watermark.image_size if Needs.PIXELS in self.needs else None

    def score(self, meta: pd.DataFrame, clip_pixels: np.ndarray | None, watermark_pixels: np.ndarray | None,
              ok: np.ndarray) -> dict[str, np.ndarray]:
        """Scores of one batch; model scores of rows that are not `ok` (unreadable) are NaN."""
        n = len(meta)
        idx = np.flatnonzero(ok)
        batch = Batch(meta=meta.iloc[idx].reset_index(drop=True))
        if self.clip is not None and len(idx):
            batch.image_embedding = self.clip.encode_images(clip_pixels[idx])
            if Needs.TEXT_EMBEDDING in self.needs:
                batch.text_embedding = self.clip.encode_texts(batch.meta["caption"].fillna("").tolist())
        if watermark_pixels is not None and len(idx):
            batch.watermark_pixels = watermark_pixels[idx]
        out: dict[str, np.ndarray] = {}
        for f in self.filters:
            if f.needs == Needs.METADATA:  # metadata scores exist for unreadable images too
                out.update(f.score(Batch(meta=meta)))
            elif len(idx):
                for name, values in f.score(batch).items():
                    out[name] = np.full(n, np.nan)
                    out[name][idx] = values
            if isinstance(f, ThresholdFilter):
                out.setdefault(f.column, np.full(n, np.nan))
        if self.clip is not None:
            emb = np.zeros((n, self.clip.embed_dim), dtype=np.float32)
            if len(idx):
                emb[idx] = batch.image_embedding
            out["embedding"] = emb
        return out


# One shard -------------------------------------------------------------------------------------
def read_shard(store: ShardStore, shard: str) -> list[dict]:
    """The samples of one download tar: key, image bytes (None when absent), caption, metadata."""
    out = []
    for key, files in sorted(read_samples(store, shard).items()):
        image = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
        out.append({"key": key, "image": image,
                    "caption": files.get("txt", b"").decode("utf-8", errors="replace"),
                    "meta": files.get("json", b"{}").decode("utf-8", errors="replace")})
    return out


def decode_image(data: bytes | None):
    """The RGB image, or (None, reason)."""
    from PIL import Image

    if data is None or not len(data):
        return None, "missing_image"
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB"), ""
    except Exception:  # noqa: BLE001 - any decoding failure is this sample's problem
        return None, "corrupt_image"


def decode_batch(samples: list[dict], clip_preprocess, watermark_size: int | None) -> dict:
    """Decode each image once; make the CLIP input and the watermark input from it."""

    n = len(samples)
    errors = np.full(n, "", dtype=object)
    clip = np.zeros((n, clip_preprocess.image_size, clip_preprocess.image_size, 3), np.uint8) \
        if clip_preprocess else None
    wm = np.zeros((n, watermark_size, watermark_size, 3), np.uint8) if watermark_size else None
    for i, sample in enumerate(samples):
        img, errors[i] = decode_image(sample["image"])
        if img is None:
            continue
        try:
            if clip is not None:
                clip[i] = clip_preprocess(img)
            if wm is not None:
                wm[i] = watermark_preprocess(img, watermark_size)
        except Exception:  # noqa: BLE001
            errors[i] = "corrupt_image"
    return {"samples": samples, "error": errors, "clip_pixels": clip, "watermark_pixels": wm}


def meta_frame(keys, captions, metas) -> pd.DataFrame:
    rows = []
    for key, caption, raw in zip(keys, captions, metas):
        try:
            meta = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        meta["key"], meta["caption"] = key, caption
        rows.append(meta)
    return pd.DataFrame(rows)


class ScoreShard:
    """A model actor's work: holds the scorers, scores one download shard per call.

    Images of the next batch are decoded in threads while the models score the current one."""

    def __init__(self, cfg: FiltersConfig, sources: dict, paths: dict, device: str):
        self.cfg, self.sources = cfg, sources
        self.scorer = BatchScorer(cfg, sources, paths, device)
        self.clip_preprocess = preprocess_for(cfg.clip.model, paths["clip"]) if "clip" in paths else None
        self.watermark_size = cfg.watermark.image_size if "watermark" in paths else None

    def __call__(self, store: ShardStore, shard: str) -> dict:
        samples = read_shard(store, shard)
        size = self.cfg.batch_size
        chunks = [samples[i:i + size] for i in range(0, len(samples), size)]
        columns: dict[str, list] = defaultdict(list)
        with ThreadPoolExecutor(max_workers=2) as pool:
            decoded = pool.map(lambda c: decode_batch(c, self.clip_preprocess, self.watermark_size), chunks)
            for batch in decoded:
                part = batch["samples"]
                meta = meta_frame([s["key"] for s in part], [s["caption"] for s in part], [s["meta"] for s in part])
                scores = self.scorer.score(meta, batch["clip_pixels"], batch["watermark_pixels"],
                                           batch["error"] == "")
                columns["key"].append(np.array([s["key"] for s in part], dtype=object))
                columns["caption"].append(np.array([s["caption"] for s in part], dtype=object))
                columns["error"].append(batch["error"])
                for col in LINEAGE:
                    columns[col].append(np.array(meta[col].tolist() if col in meta else [None] * len(meta),
                                                 dtype=object))
                for name, values in scores.items():
                    columns[name].append(values)
        return write_shard(store, shard, columns)


# Shard output ----------------------------------------------------------------------------------
def write_shard(store: ShardStore, shard: str, columns: dict[str, list]) -> dict:
    """Write one shard's scores (sorted by key) and embeddings; returns the shard's summary."""
    emb_parts = columns.pop("embedding", None)
    frame = pd.DataFrame({k: np.concatenate(v) if v else [] for k, v in columns.items()})
    order = np.argsort(frame["key"].to_numpy(dtype=object), kind="stable") if len(frame) else np.arange(0)
    frame = frame.iloc[order].reset_index(drop=True)
    for col in ("original_width", "original_height", "hash"):
        if col in frame:
            frame[col] = pd.to_numeric(frame[col], errors="coerce").astype("Int64")
    for col in ("url", "sha256", "caption", "error", "key"):
        if col in frame:
            frame[col] = frame[col].astype(object).where(frame[col].notna(), None)
    if emb_parts:
        emb = np.concatenate(emb_parts)[order].astype(np.float16)
        buf = io.BytesIO()
        np.save(buf, emb)
        store.write_bytes(buf.getvalue(), EMBEDDINGS, f"{shard}.npy")
    store.write_table(pa.Table.from_pandas(frame, preserve_index=False), SCORES, f"{shard}.parquet")
    errors = Counter(e for e in frame.get("error", []) if e)
    return {"rows_in": len(frame), "samples": len(frame), "unreadable": dict(errors)}


def input_columns(store: ShardStore, shards: list[str], downloads: dict[str, dict]) -> set[str]:
    """Columns every shard's download parquet has (a column missing anywhere counts as missing),
    from the download markers; only a marker written without `columns` sends its parquet's
    schema to be read (concurrently)."""
    def schema_names(shard: str) -> list[str]:
        with store.fs.open(store.path("download", f"{shard}.parquet"), "rb") as f:
            return pq.read_schema(f).names

    unknown = [s for s in shards if "columns" not in downloads[s]]
    with ThreadPoolExecutor(max_workers=16) as pool:
        read = dict(zip(unknown, pool.map(schema_names, unknown)))
    common: set[str] | None = None
    for shard in shards:
        names = set(read[shard] if shard in read else downloads[shard]["columns"])
        common = names if common is None else common & names
    return common or set()


def lineage(cfg: FiltersConfig, sources: dict, paths: dict) -> str:
    """What decides a shard's scores besides its download: models, weights and score sources.
    Thresholds are not in it: changing one re-selects without re-scoring."""
    scoring = cfg.model_dump(mode="json", include={"clip", "watermark", "precision"})
    scoring["watermark"] = {k: scoring["watermark"][k] for k in ("arch", "image_size", "weights", "source", "column")}
    scoring["dedup"] = cfg.dedup.enabled  # whether embeddings are stored

    builds = {name: build_of(path) for name, path in paths.items()}
    blob = json.dumps({"scoring": scoring, "sources": sources, "paths": paths, "builds": builds}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fingerprints(downloads: dict[str, dict], shards: list[str], stage_lineage: str) -> dict[str, str]:
    """Per shard: this stage's lineage joined with the fingerprint of the shard's input marker."""
    out = {}
    for shard in shards:
        upstream = downloads[shard].get("fingerprint") or ""
        out[shard] = hashlib.sha256(f"{upstream}:{stage_lineage}".encode()).hexdigest()[:16]
    return out


def run(cfg: FiltersConfig, ray_cfg: RayConfig, store: ShardStore, models_root: str,
        on_shard=None) -> ScoreResult:
    """Score every downloaded shard not yet scored with these models; return the counts over all shards."""

    downloads = store.markers("download", fields=("fingerprint", "columns", "downloaded"))
    shards = sorted(downloads)
    if not shards:
        raise ValueError(f"{store.root}: no finished download shards to score (run the download first)")
    sources = resolve_sources(cfg, input_columns(store, shards, downloads))
    paths = model_paths(cfg, sources, models_root)
    init_ray(ray_cfg)
    device = "cuda" if cfg.num_gpus_per_actor > 0 else "cpu"
    ran = runtime.run_stage(
        STEP.name, store, shards, STEP.work, kwargs={"cfg": cfg, "sources": sources, "paths": paths, "device": device},
        fingerprints=fingerprints(downloads, shards, lineage(cfg, sources, paths)), stamp={"sources": sources},
        num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor, actors=cfg.concurrency,
        retries=cfg.shard_retries, outputs=STEP.outputs, on_shard=on_shard)
    return summarize(store, shards, ran.failed, downloads)


STEP = Stage(STAGE, inputs=("download",), outputs=(SCORES, EMBEDDINGS), work=ScoreShard, result=ScoreResult)


def summarize(store: ShardStore, shards: list[str], failed: dict[str, str], downloads: dict[str, dict]) -> ScoreResult:
    markers = store.markers(STAGE, fields=("samples", "unreadable", "sources"))
    infos = [markers[s] for s in shards if s not in failed]
    unreadable: Counter = Counter()
    for info in infos:
        unreadable.update(info["unreadable"])
    lost = sum(int(downloads[s].get("downloaded", 0)) for s in failed)
    return ScoreResult(samples=sum(i["samples"] for i in infos), unreadable=dict(unreadable),
                       shards=len(infos), sources=infos[-1]["sources"] if infos else {},
                       failed=failed, failed_rows=lost)
