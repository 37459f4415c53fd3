"""The tokenize stage: kept samples -> WebDataset shards of VQ codes, one set per resolution.

For every selected shard (select/{shard}.done), the kept samples (keep true in scores/) are read
from download/{shard}.tar, joined with their captions (captions/, when captioned), resized on the
short side and centre-cropped to each resolution, and encoded by the VQ tokenizer on Ray Data
actors. Each resolution gets tokens/{res}/{shard}.tar with, per sample:
  {key}.codes.npy       uint16 (res/16, res/16), raster order
  {key}.codes_flip.npy  the same for the horizontally flipped image (tokenize.flip)
  {key}.t5.npy          float16 caption features (L, D), no padding (tokenize.text_encoder)
  {key}.json            key, caption, caption_long, caption_short, url, hash, sha256, scores
then the marker tokens/{res}/{shard}.done with the shard's counts. tokens/{res}/manifest.json
sums up every finished shard: samples, bytes per sample, codebook usage.

Every kept sample ends, per resolution, tokenized or dropped with one reason: `too_small` (its
original short side is below the resolution), `corrupt_image`, `missing_from_download`.
A sample without a generated caption is still tokenized (caption_long/short null) and counted
under `no_caption`.
"""
from __future__ import annotations

import base64
import io
import json
import logging
import os
import tarfile
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np

from tessera.config.ray import RayConfig
from tessera.config.tokenize import TokenizeConfig
from tessera.pipelines.store import ShardStore

log = logging.getLogger(__name__)
STAGE = "tokenize"
TOKENIZED = "tokenized"
NO_CAPTION = "no_caption"
# Columns of scores/{shard}.parquet that are lineage or selection, not scores.
NOT_SCORES = {"key", "url", "hash", "sha256", "original_width", "original_height", "keep", "reason",
              "caption", "error", "status"}


def tokens_folder(res: int) -> str:
    return f"tokens/{res}"


@dataclass
class TokenizeResult:
    # res -> {"rows_in", "tokenized", "no_caption", "dropped": {reason: n}, "shards"}
    per_resolution: dict[int, dict]

    def funnel(self) -> list[dict]:
        rows = []
        for res, c in sorted(self.per_resolution.items()):
            stage = f"{STAGE}_{res}"
            rows.append({"stage": stage, "outcome": TOKENIZED, "reason": "", "count": c["tokenized"] - c["no_caption"]})
            if c["no_caption"]:
                rows.append({"stage": stage, "outcome": TOKENIZED, "reason": NO_CAPTION, "count": c["no_caption"]})
            rows += [{"stage": stage, "outcome": "dropped", "reason": r, "count": n}
                     for r, n in sorted(c["dropped"].items())]
        return rows


# Reading a shard ------------------------------------------------------------------------------
def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _read_tar(store: ShardStore, shard: str, wanted: set[str]) -> tuple[dict[str, dict[str, bytes]], str]:
    """Members of the wanted keys, {key: {ext: bytes}}, and "" or why the tar stopped being readable."""
    members: dict[str, dict[str, bytes]] = defaultdict(dict)
    try:
        with store.fs.open(store.path("download", f"{shard}.tar"), "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                if member.isfile() and key in wanted:
                    members[key][ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        log.warning("Shard %s: download tar unreadable after %d samples: %s", shard, len(members), e)
        return members, f"{type(e).__name__}: {e}"
    return members, ""


def _json_value(v):
    """A parquet cell as plain JSON: numpy scalars unwrapped, NaN and NA as None."""
    import pandas as pd

    if v is None or v is pd.NA or (isinstance(v, (float, np.floating)) and v != v):
        return None
    if isinstance(v, np.generic):
        return v.item()
    return v


def read_shard(item: dict, store: ShardStore, text_caption: str) -> list[dict]:
    """One row per kept sample of a shard: image bytes (or why there are none) and its metadata."""
    shard = item["shard"]
    scores = store.read_table("scores", f"{shard}.parquet").to_pandas()
    kept = scores[scores["keep"].astype(bool)]
    captions: dict[str, dict] = {}
    if store.is_done("caption", shard):
        table = store.read_table("captions", f"{shard}.parquet", columns=["key", "caption_long", "caption_short"])
        captions = {r["key"]: r for r in table.to_pylist()}
    score_cols = [c for c in scores.columns if c not in NOT_SCORES]
    members, _ = _read_tar(store, shard, set(kept["key"]))
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
            "shard": shard, "key": key, "image": files.get("jpg") or files.get("png") or files.get("webp") or b"",
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
    out = {k: batch[k] for k in ("shard", "key", "meta", "text", "captioned")}
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
class TokenizeActor:
    """Holds the VQ tokenizer (and the text encoder) on one device; encodes batches of crops."""

    def __init__(self, cfg: TokenizeConfig, vq_path: str, text_path: str | None, device: str, threads: int):
        import torch

        from tessera.models.vq import load_vq

        torch.set_num_threads(max(1, threads))
        self.cfg, self.device = cfg, device
        # A folder (tiny:vq) carries its own config; a bare LlamaGen file is named by vq_config.
        config = None if os.path.isdir(vq_path) else cfg.vq_config
        self.vq = load_vq(vq_path, config, device=device, ema=cfg.vq_ema)
        self.text = None
        if text_path:
            from tessera.models.text_encoder import TextEncoder

            self.text = TextEncoder.from_pretrained(text_path, cfg.text_max_length, device=device,
                                                    dtype=torch.bfloat16 if device == "cuda" else None)

    def _encode(self, crops: list[bytes], res: int) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.frombuffer(b"".join(crops), dtype=np.uint8).reshape(len(crops), res, res, 3).copy())
        x = x.to(self.device).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
        return self.vq.encode(x).cpu().numpy().astype(np.uint16)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        out = {k: batch[k] for k in ("shard", "key", "meta", "captioned")}
        for r in self.cfg.resolutions:
            ok = [i for i in range(n) if batch[f"reason_{r}"][i] == ""]
            codes, flips = [b""] * n, [b""] * n
            if ok:
                crops = [batch[f"pixels_{r}"][i] for i in ok]
                for i, c in zip(ok, self._encode(crops, r)):
                    codes[i] = _npy(c)
                if self.cfg.flip:
                    flipped = [np.frombuffer(c, np.uint8).reshape(r, r, 3)[:, ::-1].tobytes() for c in crops]
                    for i, c in zip(ok, self._encode(flipped, r)):
                        flips[i] = _npy(c)
            out[f"reason_{r}"] = batch[f"reason_{r}"]
            out[f"codes_{r}"] = np.array(codes, dtype=object)
            out[f"codes_flip_{r}"] = np.array(flips, dtype=object)
        feats = [b""] * n
        if self.text is not None:
            usable = [i for i in range(n) if any(batch[f"reason_{r}"][i] == "" for r in self.cfg.resolutions)]
            if usable:
                for i, f in zip(usable, self.text.encode([str(batch["text"][i]) for i in usable])):
                    feats[i] = _npy(f.numpy().astype(np.float16))
        out["t5"] = np.array(feats, dtype=object)
        return out


# Writing a shard ------------------------------------------------------------------------------
def _pack_counts(counts: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(counts.astype(np.uint32).tobytes())).decode()


def unpack_counts(packed: str) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(packed)), dtype=np.uint32)


def write_shard(store: ShardStore, shard: str, res: int, rows: list[dict], codebook_size: int) -> dict:
    """Write tokens/{res}/{shard}.tar from the shard's encoded rows (sorted by key), then its marker."""
    import webdataset as wds

    folder = tokens_folder(res)
    dropped: Counter = Counter()
    counts = np.zeros(codebook_size, dtype=np.int64)
    tokenized = no_caption = 0
    with store.open_atomic(folder, f"{shard}.tar") as f:
        with wds.TarWriter(f) as tar:
            for row in sorted(rows, key=lambda r: r["key"]):
                if row[f"reason_{res}"]:
                    dropped[row[f"reason_{res}"]] += 1
                    continue
                item = {"__key__": row["key"], "codes.npy": row[f"codes_{res}"], "json": row["meta"].encode()}
                if row[f"codes_flip_{res}"]:
                    item["codes_flip.npy"] = row[f"codes_flip_{res}"]
                if row["t5"]:
                    item["t5.npy"] = row["t5"]
                tar.write(item)
                counts += np.bincount(np.load(io.BytesIO(row[f"codes_{res}"])).ravel(), minlength=codebook_size)
                tokenized += 1
                no_caption += not row["captioned"]
    size = store.fs.size(store.path(folder, f"{shard}.tar"))
    info = {"rows_in": len(rows), "tokenized": tokenized, "no_caption": no_caption, "dropped": dict(dropped),
            "bytes": int(size), "code_counts": _pack_counts(counts)}
    store.mark_done(folder, shard, info)
    return info


# The stage --------------------------------------------------------------------------------------
def input_shards(store: ShardStore) -> list[str]:
    """Shards whose selection is final (and whose download is there)."""
    return [s for s in store.done_shards("select") if store.is_done("download", s)]


def _kept_count(store: ShardStore, shard: str) -> int:
    return int(store.read_table("scores", f"{shard}.parquet", columns=["keep"]).column("keep").to_numpy(
        zero_copy_only=False).astype(bool).sum())


def run(cfg: TokenizeConfig, ray_cfg: RayConfig, store: ShardStore, models_root: str,
        on_shard=None) -> TokenizeResult:
    """Tokenize every selected shard not yet done at every resolution; return counts over all shards."""
    shards = input_shards(store)
    if not shards:
        raise ValueError(f"{store.root}: no selected shards to tokenize (run score and select first)")
    for res in cfg.resolutions:
        store.clear_temporaries(tokens_folder(res))
    todo = [s for s in shards if not all(store.is_done(tokens_folder(r), s) for r in cfg.resolutions)]
    log.info("Tokenize: %d of %d shards to do at %s px (%d already done).", len(todo), len(shards),
             "/".join(map(str, cfg.resolutions)), len(shards) - len(todo))
    if todo:
        _tokenize(cfg, ray_cfg, store, models_root, todo, on_shard)
    result = summarize(store, shards, cfg.resolutions)
    for res in cfg.resolutions:
        write_manifest(store, res, shards, cfg)
    return result


def _tokenize(cfg: TokenizeConfig, ray_cfg: RayConfig, store: ShardStore, models_root: str,
              todo: list[str], on_shard) -> None:
    import ray
    from tqdm.auto import tqdm

    from tessera.models.tiny import resolve
    from tessera.pipelines.raytools import init_ray

    vq_path = resolve(cfg.vq, models_root)
    text_path = resolve(cfg.text_encoder, models_root) if cfg.text_encoder else None
    codebook_size = _codebook_size(vq_path, cfg)
    device = "cuda" if cfg.num_gpus_per_actor > 0 else "cpu"
    init_ray(ray_cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images
    expected = {s: _kept_count(store, s) for s in todo}
    with tqdm(total=sum(expected.values()), desc=STAGE, unit="img") as bar:
        for start in range(0, len(todo), cfg.shards_per_pass):
            chunk = todo[start:start + cfg.shards_per_pass]
            pending: dict[str, list[dict]] = {s: [] for s in chunk}
            for shard in [s for s in chunk if expected[s] == 0]:
                _finish(store, shard, pending.pop(shard), cfg, codebook_size, on_shard)
            if not pending:
                continue
            ds = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending))
            ds = ds.flat_map(read_shard, fn_kwargs={"store": store, "text_caption": cfg.text_caption})
            ds = ds.map_batches(prepare_batch, batch_size=cfg.batch_size, batch_format="numpy",
                                fn_kwargs={"resolutions": cfg.resolutions})
            ds = ds.map_batches(TokenizeActor, batch_size=cfg.batch_size, batch_format="numpy",
                                fn_constructor_kwargs={"cfg": cfg, "vq_path": vq_path, "text_path": text_path,
                                                       "device": device, "threads": int(cfg.num_cpus_per_actor)},
                                compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
                                num_gpus=cfg.num_gpus_per_actor or None, num_cpus=cfg.num_cpus_per_actor)
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                cols = list(out)
                for i in range(len(out["key"])):
                    row = {c: out[c][i] for c in cols}
                    shard = str(row["shard"])
                    pending[shard].append(row)
                    if len(pending[shard]) == expected[shard]:
                        _finish(store, shard, pending.pop(shard), cfg, codebook_size, on_shard)
                bar.update(len(out["key"]))
            for shard, rows in pending.items():
                raise RuntimeError(f"shard {shard}: {len(rows)} of {expected[shard]} kept samples came back")


def _finish(store, shard, rows, cfg, codebook_size, on_shard) -> None:
    for res in cfg.resolutions:
        if not store.is_done(tokens_folder(res), shard):
            write_shard(store, shard, res, rows, codebook_size)
    if on_shard:
        on_shard(shard)


def _codebook_size(vq_path: str, cfg: TokenizeConfig) -> int:
    from tessera.models.vq import CONFIG_FILE, VQ_CONFIGS

    if os.path.isdir(vq_path) and os.path.exists(os.path.join(vq_path, CONFIG_FILE)):
        with open(os.path.join(vq_path, CONFIG_FILE)) as f:
            return int(json.load(f)["codebook_size"])
    return VQ_CONFIGS[cfg.vq_config].codebook_size


def summarize(store: ShardStore, shards: list[str], resolutions: list[int]) -> TokenizeResult:
    per: dict[int, dict] = {}
    for res in resolutions:
        infos = [store.done_info(tokens_folder(res), s) for s in shards if store.is_done(tokens_folder(res), s)]
        dropped: Counter = Counter()
        for info in infos:
            dropped.update(info["dropped"])
        per[res] = {"rows_in": sum(i["rows_in"] for i in infos), "tokenized": sum(i["tokenized"] for i in infos),
                    "no_caption": sum(i["no_caption"] for i in infos), "dropped": dict(dropped),
                    "shards": len(infos)}
    return TokenizeResult(per)


def write_manifest(store: ShardStore, res: int, shards: list[str], cfg: TokenizeConfig) -> dict:
    """tokens/{res}/manifest.json: shards, sample counts, bytes per sample, codebook usage."""
    folder = tokens_folder(res)
    done = [s for s in shards if store.is_done(folder, s)]
    infos = {s: store.done_info(folder, s) for s in done}
    counts = None
    for info in infos.values():
        c = unpack_counts(info["code_counts"]).astype(np.int64)
        counts = c if counts is None else counts + c
    samples = sum(i["tokenized"] for i in infos.values())
    total = int(counts.sum()) if counts is not None else 0
    p = counts[counts > 0] / total if total else np.zeros(0)
    manifest = {
        "resolution": res, "grid": [res // 16, res // 16], "vq": cfg.vq, "flip": cfg.flip,
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
