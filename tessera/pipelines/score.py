"""The score stage: every downloaded sample gets every score, in one pass on Ray Data.

    shards -> read samples (tasks) -> decode each image once, CLIP and watermark inputs (tasks)
           -> score (actor pool: one CLIP image pass feeds CLIP score, aesthetic, NSFW and the
              embedding for near-duplicates; the watermark detector takes the same decoded image)
           -> the driver gathers rows per shard and writes scores/{shard}.parquet and
              embeddings/{shard}.npy, then the marker score/{shard}.done.

Nothing is dropped here: an unreadable image gets `error` set and NaN model scores, and the
select stage turns scores into keep or drop. Scores the input already carries (similarity,
pwatermark, punsafe, aesthetic) can be read instead of computed (`source: metadata`).
"""
from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tessera.config.ray import RayConfig
from tessera.config.score import FiltersConfig
from tessera.filters import Batch, Needs, ThresholdFilter, build_filters, resolve_sources
from tessera.pipelines.store import ShardStore

log = logging.getLogger(__name__)
STAGE = "score"
SCORES = "scores"
EMBEDDINGS = "embeddings"
# Carried from each sample's img2dataset metadata into scores/{shard}.parquet.
LINEAGE = ("url", "hash", "sha256", "original_width", "original_height")


@dataclass
class ScoreResult:
    samples: int
    unreadable: dict[str, int]
    shards: int
    sources: dict[str, dict] = field(default_factory=dict)

    def funnel(self) -> list[dict]:
        # Nothing is dropped while scoring; unreadable images are dropped by select, with a reason.
        return [{"stage": STAGE, "outcome": "scored", "reason": "", "count": self.samples}]


# Models ----------------------------------------------------------------------------------------
def model_path(ref: str, models_root: str) -> str:
    """A config's model reference as a local path: `tiny:NAME` is built, relative paths are under models_root."""
    from tessera.models import tiny

    return tiny.resolve(ref, models_root)


def needs_clip(cfg: FiltersConfig, sources: dict[str, dict]) -> bool:
    return any(Needs.IMAGE_EMBEDDING in f.needs or Needs.TEXT_EMBEDDING in f.needs
               for f in build_filters(cfg, sources))


def model_paths(cfg: FiltersConfig, sources: dict[str, dict], models_root: str) -> dict[str, str]:
    """Local paths of the models this run computes with; a missing file is a clear error now."""
    from tessera.models.weights import weights_file

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
        from tessera.models.aesthetic import load_aesthetic
        from tessera.models.clip import Clip
        from tessera.models.nsfw import load_nsfw
        from tessera.models.watermark import load_watermark

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


# Ray Data steps ------------------------------------------------------------------------------------
def read_shard(row: dict, store: ShardStore) -> list[dict]:
    """The samples of one download tar: key, image bytes (None when absent), caption, metadata."""
    samples: dict[str, dict] = defaultdict(dict)
    path = store.path("download", f"{row['shard']}.tar")
    try:
        with store.fs.open(path, "rb") as f, tarfile.open(fileobj=f) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                samples[key][ext] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError) as e:
        raise RuntimeError(f"{store.url('download', row['shard'] + '.tar')} cannot be read ({e}); remove "
                           f"download/{row['shard']}.done to download that shard again") from e
    out = []
    for key in sorted(samples):
        files = samples[key]
        image = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
        out.append({"shard": row["shard"], "key": key, "image": image,
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


def decode_batch(batch: dict, clip_preprocess, watermark_size: int | None) -> dict:
    """Decode each image once; make the CLIP input and the watermark input from it."""
    from tessera.models.watermark import preprocess as watermark_preprocess

    n = len(batch["key"])
    errors = np.full(n, "", dtype=object)
    clip = np.zeros((n, clip_preprocess.image_size, clip_preprocess.image_size, 3), np.uint8) \
        if clip_preprocess else None
    wm = np.zeros((n, watermark_size, watermark_size, 3), np.uint8) if watermark_size else None
    for i, data in enumerate(batch["image"]):
        img, errors[i] = decode_image(data)
        if img is None:
            continue
        try:
            if clip is not None:
                clip[i] = clip_preprocess(img)
            if wm is not None:
                wm[i] = watermark_preprocess(img, watermark_size)
        except Exception:  # noqa: BLE001
            errors[i] = "corrupt_image"
    out = {k: batch[k] for k in ("shard", "key", "caption", "meta")}
    out["error"] = errors
    if clip is not None:
        out["clip_pixels"] = clip
    if wm is not None:
        out["watermark_pixels"] = wm
    return out


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


class ScoreActor:
    """One model replica in Ray Data's actor pool."""

    def __init__(self, cfg: FiltersConfig, sources: dict, paths: dict, device: str):
        self.scorer = BatchScorer(cfg, sources, paths, device)

    def __call__(self, batch: dict) -> dict:
        meta = meta_frame(batch["key"], batch["caption"], batch["meta"])
        ok = np.asarray(batch["error"]) == ""
        scores = self.scorer.score(meta, batch.get("clip_pixels"), batch.get("watermark_pixels"), ok)
        out = {"shard": batch["shard"], "key": batch["key"], "caption": batch["caption"], "error": batch["error"]}
        for col in LINEAGE:
            out[col] = np.array(meta[col].tolist() if col in meta else [None] * len(meta), dtype=object)
        out.update(scores)
        return out


# Shard output ----------------------------------------------------------------------------------
def write_shard(store: ShardStore, shard: str, columns: dict[str, list], sources: dict) -> dict:
    """Write one shard's scores (sorted by key) and embeddings, then its marker."""
    emb_parts = columns.pop("embedding", None)
    frame = pd.DataFrame({k: np.concatenate(v) if v else [] for k, v in columns.items()})
    order = np.argsort(frame["key"].to_numpy(dtype=object), kind="stable") if len(frame) else np.arange(0)
    frame = frame.iloc[order].reset_index(drop=True).drop(columns=["shard"], errors="ignore")
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
    info = {"samples": len(frame), "unreadable": dict(errors), "sources": sources}
    store.mark_done(STAGE, shard, info)
    return info


def input_columns(store: ShardStore, shards: list[str]) -> set[str]:
    """Columns every shard's download parquet has (a column missing anywhere counts as missing)."""
    common: set[str] | None = None
    for shard in shards:
        with store.fs.open(store.path("download", f"{shard}.parquet"), "rb") as f:
            names = set(pq.read_schema(f).names)
        common = names if common is None else common & names
    return common or set()


def run(cfg: FiltersConfig, ray_cfg: RayConfig, store: ShardStore, models_root: str,
        on_shard=None) -> ScoreResult:
    """Score every downloaded shard not yet scored; return the counts over all shards."""
    import ray

    from tessera.models.clip import preprocess_for
    from tessera.pipelines.raytools import init_ray

    shards = store.done_shards("download")
    if not shards:
        raise ValueError(f"{store.root}: no finished download shards to score (run the download first)")
    for folder in (SCORES, EMBEDDINGS, STAGE):
        store.clear_temporaries(folder)
    todo = [s for s in shards if not store.is_done(STAGE, s)]
    log.info("Score: %d of %d shards to do (%d already done).", len(todo), len(shards), len(shards) - len(todo))
    sources = resolve_sources(cfg, input_columns(store, shards))
    if todo:
        paths = model_paths(cfg, sources, models_root)
        use_gpu = cfg.num_gpus_per_actor > 0
        device = "cuda" if use_gpu else "cpu"
        clip_pre = preprocess_for(cfg.clip.model, paths["clip"]) if "clip" in paths else None
        wm_size = cfg.watermark.image_size if "watermark" in paths else None
        init_ray(ray_cfg)
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images per shard
        expected = {s: store.done_info("download", s).get("downloaded") for s in todo}
        ds = ray.data.from_items([{"shard": s} for s in todo], override_num_blocks=len(todo))
        ds = ds.flat_map(read_shard, fn_kwargs={"store": store})
        ds = ds.map_batches(decode_batch, batch_size=cfg.batch_size, batch_format="numpy",
                            fn_kwargs={"clip_preprocess": clip_pre, "watermark_size": wm_size})
        ds = ds.map_batches(ScoreActor, batch_size=cfg.batch_size, batch_format="numpy",
                            fn_constructor_kwargs={"cfg": cfg, "sources": sources, "paths": paths, "device": device},
                            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
                            num_gpus=cfg.num_gpus_per_actor or None,
                            num_cpus=cfg.num_cpus_per_actor)
        pending: dict[str, dict[str, list]] = {s: defaultdict(list) for s in todo}
        received: Counter = Counter()
        from tqdm.auto import tqdm

        with tqdm(total=sum(v or 0 for v in expected.values()), desc=STAGE, unit="img") as bar:
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                shard_col = np.asarray(out["shard"])
                for shard in np.unique(shard_col):
                    sel = shard_col == shard
                    for k, v in out.items():
                        pending[shard][k].append(np.asarray(v)[sel])
                    received[shard] += int(sel.sum())
                    if received[shard] == expected.get(shard):
                        write_shard(store, shard, pending.pop(shard), sources)
                        if on_shard:
                            on_shard(shard)
                bar.update(len(shard_col))
        for shard, columns in pending.items():  # empty shards, or counts the download info did not predict
            if expected.get(shard) not in (None, received[shard]):
                log.warning("Shard %s: the download recorded %s samples, its tar holds %d.",
                            shard, expected[shard], received[shard])
            write_shard(store, shard, columns, sources)
            if on_shard:
                on_shard(shard)
    return summarize(store, shards)


def summarize(store: ShardStore, shards: list[str]) -> ScoreResult:
    infos = [store.done_info(STAGE, s) for s in shards]
    unreadable: Counter = Counter()
    for info in infos:
        unreadable.update(info["unreadable"])
    return ScoreResult(samples=sum(i["samples"] for i in infos), unreadable=dict(unreadable),
                       shards=len(shards), sources=infos[-1]["sources"] if infos else {})
