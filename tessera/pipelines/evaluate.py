"""The eval stage: sample a prompt set from checkpoints and measure the images; evaluate the tokenizer.

Per checkpoint, under {runs_root}/{run}/eval/{label}/ (label: `untrained`, `stage1-step-N`, ...):
    samples/{shard}/{row}_{i}.png   the images
    rows/{shard}.parquet            per image: prompt, image, CLIP score, what it shows, hits
    moments/{shard}.{clip,inception}.npz   feature moments (sum, sum of outer products, count)
    markers/{shard}.done            the shard's summary and fingerprint, written last
and, for the whole run, eval/metrics.jsonl (one line per checkpoint), eval/tensorboard/{stage}/,
eval/samples.html (the samples grouped by prompt, one column per checkpoint) and eval/tokenizer/.

The per-shard work runs in model actors on Ray (one per GPU, or CPU workers): each holds the
generator, VQ, text encoder, CLIP (and Inception) once and turns a shard of prompts into images and
small files. The driver only merges moments and sums: FID and the CLIP-feature Fréchet distance
come from merged moments, which equal a single pass over all the features.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import posixpath
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from tessera.config import RunConfig
from tessera.config.eval import EvalConfig
from tessera.core.raytools import init_ray
from tessera.core.runtime import StageRun, run_stage
from tessera.core.store import ShardStore
from tessera.eval.clip_similarity import clip_cosines, clip_inputs
from tessera.eval.fid import (
    InceptionFeatures,
    Moments,
    frechet_distance,
    inception_score,
    merge,
    precision_recall,
    weights_sha256,
)
from tessera.eval.prompt_following import (
    READER,
    ShapeTemplates,
    calibrated_templates,
    chance_floors,
    judge,
    read_picture,
    templates_from_bytes,
    templates_to_bytes,
)
from tessera.eval.prompts import TRUTH, has_truth, palette_of, read_prompt_set
from tessera.eval.protocols import (
    Gaussian,
    centre_crop_lanczos,
    read_reference_stats,
    row_fields,
)
from tessera.eval.protocols import protocol as eval_protocol
from tessera.eval.results import (
    append_metrics,
    read_metrics,
    write_page,
    write_tensorboard,
)
from tessera.eval.tokenizer_eval import code_counts, psnr_ssim, reconstruct, usage_cap
from tessera.models.clip import Clip
from tessera.models.generation import render
from tessera.models.gpt import GPT, gpt_config
from tessera.models.identity import resolution_of
from tessera.models.refs import resolve
from tessera.models.text_encoder import TextEncoder
from tessera.models.vq import load_vq
from tessera.pipelines.sample import load_generator
from tessera.pipelines.score import model_path
from tessera.pipelines.tokenize import centre_crop
from tessera.training.checkpoint import (
    is_sharded,
    latest_checkpoint,
    read_checkpoint_any,
    read_train_state,
    stage_dir,
    step_of,
)

log = logging.getLogger(__name__)
MARKERS = "markers"
UNTRAINED = "untrained"


# Inputs: the prompt set, the image lists, the checkpoints -----------------------------------------
def prompt_store(cfg: RunConfig) -> tuple[ShardStore, str]:
    """Where the prompt set is: the folder of `eval.prompts` and the file's name."""
    if not cfg.eval.prompts:
        raise ValueError("eval.prompts is not set: give a prompt-set parquet (a `prompt` column, optionally `image`)")
    folder, name = posixpath.split(cfg.eval.prompts)
    return ShardStore(folder or "."), name


def read_image(url: str) -> np.ndarray:
    """An image file (local or fsspec URL) as (H, W, 3) uint8."""
    import fsspec
    from PIL import Image

    with fsspec.open(url, "rb") as f:
        return np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))


def square(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize the short side and crop the centre, as the tokenize stage prepares training images."""
    from PIL import Image


    return np.asarray(centre_crop(Image.fromarray(pixels), size))


@dataclass
class Target:
    """A checkpoint to evaluate: `label` names its folder, `stage` its TensorBoard run."""

    label: str
    checkpoint: str  # for the untrained model: the checkpoint whose architecture it copies
    stage: str
    step: int
    untrained: bool = False


def targets(cfg: RunConfig, run: str, names: list[str]) -> list[Target]:
    """The checkpoints the names stand for; a stage without a checkpoint yet is skipped with a note."""
    newest = {s: latest_checkpoint(ShardStore(stage_dir(cfg.runs_root, run, s))) for s in ("stage1", "stage2")}
    out = []
    for name in names:
        if name == UNTRAINED:
            base = newest["stage1"] or newest["stage2"]
            if base is None:
                log.warning("eval: no checkpoint to copy the architecture of; skipping the untrained model.")
                continue
            out.append(Target(UNTRAINED, base, UNTRAINED, 0, untrained=True))
        elif name in newest:
            if newest[name] is None:
                log.warning("eval: %s has no checkpoint yet; skipping it.", name)
                continue
            step = step_of(newest[name])
            out.append(Target(f"{name}-step-{step:08d}", newest[name], name, step))
        else:
            stem = name.rstrip("/").rsplit("/", 1)[-1].removesuffix(".pt")
            path = resolve(name, cfg.models_root)  # a released file under models_root, like every model
            out.append(Target(f"checkpoint-{stem}", path, stem, step_of(name)))
    return out


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_ranges(n: int, size: int) -> dict[str, tuple[int, int]]:
    return {f"{i:05d}": (i * size, min(n, (i + 1) * size)) for i in range(math.ceil(n / size))}


# The per-shard work -----------------------------------------------------------------------------------
class Features:
    """CLIP (image embeddings, CLIP score) and, when its weights are given, Inception-v3."""

    def __init__(self, ecfg: EvalConfig, models_root: str, device: str):
        self.clip = Clip(ecfg.clip.model, model_path(ecfg.clip.checkpoint, models_root), device=device,
                         force_quick_gelu=ecfg.clip.force_quick_gelu)
        self.protocol = eval_protocol(ecfg.protocol)
        self.batch_size = ecfg.batch_size  # images per model call: memory bounded at any shard size
        self.inception = None
        if ecfg.inception:
            self.inception = InceptionFeatures(model_path(ecfg.inception, models_root), device=device,
                                               logits=ecfg.inception_score, sha256=ecfg.inception_sha256)
        self.keep_features = ecfg.inception_score or ecfg.precision_recall

    def measure(self, pixels: np.ndarray, prompts: list[str] | None = None) -> dict[str, np.ndarray]:
        b = self.batch_size
        parts = [self._measure(pixels[i:i + b], None if prompts is None else prompts[i:i + b])
                 for i in range(0, len(pixels), b)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _measure(self, pixels: np.ndarray, prompts: list[str] | None = None) -> dict[str, np.ndarray]:
        out = {}
        pixels = self.protocol.prepare(pixels)
        if prompts is not None:
            cosines, out["clip"] = clip_cosines(self.clip, pixels, self.protocol.captions(prompts))
            out["clip_score"] = self.protocol.clip_scores(cosines)
        else:
            out["clip"] = self.clip.encode_images(clip_inputs(self.clip, pixels))
        if self.inception is not None:
            out.update(self.inception(pixels))
        return out

    def write(self, store: ShardStore, shard: str, measured: dict[str, np.ndarray], prefix: str = "") -> None:
        """Moments of each feature set (and the Inception features themselves when IS/PR need them)."""
        store.write_bytes(Moments.of(measured["clip"]).to_bytes(), f"{prefix}moments", f"{shard}.clip.npz")
        if self.inception is not None:
            store.write_bytes(Moments.of(measured["2048"]).to_bytes(), f"{prefix}moments", f"{shard}.inception.npz")
            if self.keep_features:
                buf = io.BytesIO()
                keep = {k: v.astype(np.float32) for k, v in measured.items() if k not in ("clip", "clip_score")}
                np.savez(buf, **keep)
                store.write_bytes(buf.getvalue(), f"{prefix}features", f"{shard}.npz")


def to_uint8(images) -> np.ndarray:
    """Decoded images (N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


class SampleWorker:
    """Holds one checkpoint's generator with its VQ, text encoder and feature models; a shard of
    prompts in, images and per-image measurements out."""

    def __init__(self, target: dict, prompts_url: str, ranges: dict, ecfg: EvalConfig, models_root: str,
                 reader_cache: str | None = None):
        import torch


        self.ecfg, self.ranges, self.device = ecfg, ranges, ecfg.device
        model, _ = load_generator(target["checkpoint"], gpt_config(ecfg.model, text_rope=ecfg.text_rope),
                                  ecfg.resolution, self.device)
        if target["untrained"]:  # the same architecture, freshly initialised
            torch.manual_seed(ecfg.seed)
            with torch.device(self.device):
                model = GPT(model.cfg, grid=model.grid).eval()
        if self.device.startswith("cuda"):
            model = model.to(torch.bfloat16)
            model.set_grid(model.grid)  # the RoPE table stays in fp32
        self.model = model
        root = models_root
        self.text_encoder = TextEncoder.from_pretrained(resolve(ecfg.text_encoder, root),
                                                        max_length=model.cfg.cls_token_num, device=self.device,
                                                        clean=ecfg.caption_clean)
        self.vq = load_vq(resolve(ecfg.vq, root), device=self.device)
        self.features = Features(ecfg, root, self.device)
        table = ShardStore(posixpath.dirname(prompts_url)).read_table(posixpath.basename(prompts_url))
        self.rows = table.to_pylist()
        self.palette = palette_of(table) if has_truth(table) else None
        self.reader_cache = reader_cache

    def templates(self, resolution: int) -> ShapeTemplates:
        """The prompt reader's shape templates calibrated through this VQ at `resolution`, fitted
        once per VQ, resolution and palette and kept beside the run's evaluation."""
        key = f"{resolution}-{fingerprint(self.ecfg.vq, resolution, self.palette)}.npz"
        cache = ShardStore(self.reader_cache) if self.reader_cache else None
        if cache is not None and cache.exists(key):
            with cache.fs.open(cache.path(key), "rb") as f:
                return templates_from_bytes(f.read())
        t0 = time.perf_counter()
        templates = calibrated_templates(self.vq, resolution, self.palette, batch_size=self.ecfg.batch_size)
        log.info("eval: prompt reader calibrated through the VQ at %dpx in %.1f s.", resolution,
                 time.perf_counter() - t0)
        if cache is not None:
            cache.write_bytes(templates_to_bytes(templates), key)
        return templates

    def __call__(self, store: ShardStore, shard: str) -> dict:
        import torch


        ecfg = self.ecfg
        start, stop = self.ranges[shard]
        rows = self.rows[start:stop]
        prompts = [r["prompt"] for r in rows for _ in range(ecfg.images_per_prompt)]
        t0 = time.perf_counter()
        generator = torch.Generator(self.device).manual_seed(ecfg.seed * 1_000_003 + int(shard))
        images, tokens_per_s = render(self.model, self.vq, self.text_encoder, prompts, batch_size=ecfg.batch_size,
                                      generator=generator, cfg_scale=ecfg.cfg_scale, temperature=ecfg.temperature,
                                      top_k=ecfg.top_k, top_p=ecfg.top_p, use_cache=True)
        pixels = to_uint8(images)
        measured = self.features.measure(pixels, prompts)
        truth = all(all(r.get(c) is not None for c in TRUTH) for r in rows)
        out, hits = [], {}
        templates = self.templates(pixels.shape[1]) if truth else None
        for k, (p, prompt) in enumerate(zip(pixels, prompts)):
            row = rows[k // ecfg.images_per_prompt]
            name = f"{start + k // ecfg.images_per_prompt:06d}_{k % ecfg.images_per_prompt}.png"
            store.write_bytes(png(p), "samples", shard, name)
            rec = {"row": start + k // ecfg.images_per_prompt, "prompt": prompt, "image": f"samples/{shard}/{name}",
                   "clip_score": float(measured["clip_score"][k])}
            if truth:
                seen = read_picture(p, self.palette, templates)
                judged = judge(seen, row)
                rec.update({f"seen_{a}": v for a, v in seen.items()})
                rec.update({f"hit_{a}": v for a, v in judged.items()})
                for a, v in judged.items():
                    hits[a] = hits.get(a, 0) + int(v)
            out.append(rec)
        store.write_table(pa.Table.from_pylist(out), "rows", f"{shard}.parquet")
        self.features.write(store, shard, measured)
        return {"images": len(out), "rows_in": len(out), "prompts": len(rows),
                "clip_score_sum": float(measured["clip_score"].sum()),
                "judged": len(out) if truth else 0, "hits": hits, "tokens_per_s": tokens_per_s,
                "seconds": time.perf_counter() - t0}


class ImageWorker:
    """Reference images (FID's real set) or held-out images (the tokenizer's): a shard of image
    files in, feature moments (and, for the tokenizer, reconstruction metrics) out."""

    def __init__(self, list_url: str, ranges: dict, ecfg: EvalConfig, models_root: str, resolutions: list[int],
                 tokenizer: bool = False):
        self.ecfg, self.ranges, self.tokenizer = ecfg, ranges, tokenizer
        self.features = Features(ecfg, models_root, ecfg.device)
        listing = ShardStore(posixpath.dirname(list_url)).read_table(posixpath.basename(list_url))
        self.urls = listing["image"].to_pylist()
        self.resolutions = resolutions
        if tokenizer:
            self.vq = load_vq(resolve(ecfg.tokenizer.vq or ecfg.vq, models_root), device=ecfg.device)

    def _load(self, urls: list[str]) -> tuple[list[np.ndarray], int]:
        """The readable images; one bad file never stops the shard, but a shard of which no image
        can be read fails (a wrong path or a broken copy of the set, not a few bad files)."""
        images, failed, first_error = [], 0, ""
        for url in urls:
            try:
                images.append(read_image(url))
            except Exception as e:  # noqa: BLE001 - decoding errors come in many types
                failed += 1
                first_error = first_error or f"{url}: {e}"
                log.warning("eval: cannot read %s: %s", url, e)
        if urls and not images:
            raise ValueError(f"none of the shard's {len(urls)} images can be read (first: {first_error})")
        return images, failed

    def __call__(self, store: ShardStore, shard: str) -> dict:
        start, stop = self.ranges[shard]
        images, failed = self._load(self.urls[start:stop])
        summary = {"images": len(images), "unreadable": failed, "rows_in": stop - start}
        crop = self.features.protocol.resolution and not self.tokenizer  # the protocol's own crop and filter
        for res in self.resolutions:
            pixels = np.stack([centre_crop_lanczos(img, res) if crop else square(img, res) for img in images])
            if not self.tokenizer:  # the reference set: one resolution per store
                self.features.write(store, shard, self.features.measure(pixels))
                continue

            recon, codes = reconstruct(self.vq, pixels, self.ecfg.tokenizer.batch_size)
            psnr, ssim = psnr_ssim(pixels, recon)
            self.features.write(store, shard, self.features.measure(pixels), prefix=f"{res}/original/")
            self.features.write(store, shard, self.features.measure(recon), prefix=f"{res}/reconstructed/")
            buf = io.BytesIO()
            np.save(buf, code_counts(codes, self.vq.config.codebook_size))
            store.write_bytes(buf.getvalue(), f"{res}", "codes", f"{shard}.npy")
            summary[str(res)] = {"psnr_sum": float(psnr.sum()), "ssim_sum": float(ssim.sum())}
        return summary


# Running the shards on Ray (the stage runtime) -------------------------------------------------
def map_shards(store: ShardStore, shards: list[str], worker, kwargs: dict, fp: str, ecfg: EvalConfig,
               desc: str) -> StageRun:
    """Run the `worker` class over the shards in `num_workers` actors (one GPU each when
    `use_gpu`); shards whose marker has this fingerprint are skipped. `done` holds the summary of
    every finished shard, skipped ones included."""
    run = run_stage(MARKERS, store, shards, worker, kwargs=kwargs, fingerprints={s: fp for s in shards},
                    num_gpus=1 if ecfg.use_gpu else 0, actors=min(ecfg.num_workers, len(shards)),
                    retries=ecfg.retries, desc=desc)
    markers = store.markers(MARKERS)
    run.done = {s: markers[s] for s in shards if s in markers and s not in run.failed}
    return run


def shard_files(store: ShardStore, folder: str, shards, suffix: str) -> list[bytes]:
    """The files of these (finished) shards; files of shards outside the current run are never read."""
    out = []
    for shard in sorted(shards):
        if store.exists(folder, f"{shard}{suffix}"):
            with store.fs.open(store.path(folder, f"{shard}{suffix}"), "rb") as f:
                out.append(f.read())
    return out


def merged(store: ShardStore, folder: str, suffix: str, shards) -> Moments | None:
    parts = [Moments.from_bytes(b) for b in shard_files(store, folder, shards, suffix)]
    return merge(parts) if parts else None


def _write_list(store: ShardStore, urls: list[str], name: str) -> str:
    store.write_table(pa.table({"image": pa.array(urls, pa.string())}), name)
    return store.url(name)


def image_list(cfg: RunConfig, pattern: str | None, prompts: pa.Table, limit: int | None = None) -> list[str]:
    """A glob's image files (sorted), else the prompt set's `image` column."""
    if pattern:
        import fsspec

        fs, _ = fsspec.core.url_to_fs(pattern)
        urls = sorted(fs.glob(pattern))
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        urls = [u if protocol in ("file", "local") else f"{protocol}://{u}" for u in urls]
        if not urls:
            raise FileNotFoundError(f"no image files match {pattern}")
    elif "image" in prompts.column_names:
        urls = [u for u in prompts["image"].to_pylist() if u]
    else:
        urls = []
    return urls[:limit] if limit else urls


# The driver -------------------------------------------------------------------------------------------
@dataclass
class EvalResult:
    rows: list[dict]  # one per checkpoint evaluated now: label, stage, step and the metrics
    history: list[dict]  # every checkpoint of the run evaluated so far (metrics.jsonl)
    tokenizer: list[dict]  # one per resolution
    page: str | None
    metrics_file: str
    failed: dict  # label -> {shard: error}


def _resolution(ecfg: EvalConfig, target: Target) -> int:
    if ecfg.resolution:
        return ecfg.resolution
    path = target.checkpoint
    return resolution_of(read_train_state(path) if is_sharded(path) else read_checkpoint_any(path), path) or 256


def reference_moments(cfg: RunConfig, ev: ShardStore, prompts: pa.Table, res: int) -> dict[str, Moments]:
    """Feature moments of the reference images at one resolution (computed once, then reused);
    the Inception statistics come from eval.reference_stats when given. Failed reference shards
    come back under "failed" (shard -> error) instead: no distance is computed against part of the set."""
    ecfg = cfg.eval
    if ecfg.reference_stats:
        return {"inception": read_reference_stats(resolve(ecfg.reference_stats, cfg.models_root))}
    urls = image_list(cfg, ecfg.reference, prompts)
    if not urls:
        return {}
    store = ShardStore(ev.url("reference", str(res)))
    list_url = _write_list(store, urls, "images.parquet")
    ranges = shard_ranges(len(urls), ecfg.shard_size)
    fp = fingerprint(urls[:3], len(urls), res, ecfg.clip.model_dump(), ecfg.inception, ecfg.protocol,
                     ecfg.inception_score, ecfg.precision_recall)
    run = map_shards(store, list(ranges), ImageWorker,
                     {"list_url": list_url, "ranges": ranges, "ecfg": ecfg, "models_root": cfg.models_root,
                      "resolutions": [res]}, fp, ecfg, desc=f"eval: reference images at {res}px")
    if run.failed:
        log.error("eval: %s; no Frechet distance against an incomplete reference set.", failed_reference(run.failed))
        return {"failed": dict(run.failed)}
    out = {}
    for name in ("clip", "inception"):
        m = merged(store, "moments", f".{name}.npz", run.done)
        if m is not None:
            out[name] = m
    return out


def failed_reference(failed: dict[str, str]) -> str:
    """One line naming every failed reference shard with its error."""
    return "reference shard(s) failed: " + "; ".join(f"{shard} ({error.strip().splitlines()[-1] if error.strip() else 'no error'})"
                                                    for shard, error in sorted(failed.items()))


def _prompt_metrics(summaries: list[dict]) -> dict:
    images = sum(s["images"] for s in summaries)
    out = {"images": images, "prompts": sum(s["prompts"] for s in summaries),
           "clip_score": sum(s["clip_score_sum"] for s in summaries) / max(images, 1),
           "tokens_per_s": float(np.mean([s["tokens_per_s"] for s in summaries])) if summaries else 0.0}
    judged = sum(s["judged"] for s in summaries)
    if judged:
        for attr in ("color", "shape", "place", "background", "all"):
            hits = sum(s["hits"].get(attr, 0) for s in summaries)
            out["prompt_following" if attr == "all" else f"prompt_following_{attr}"] = hits / judged
    return out


def _inception_extras(ecfg: EvalConfig, store: ShardStore, shards, reference: ShardStore | None) -> dict:
    """IS and precision/recall need every feature vector, not moments: read in one place, on request."""

    def load(s: ShardStore, names) -> dict[str, np.ndarray]:
        parts = [dict(np.load(io.BytesIO(b))) for b in shard_files(s, "features", names, ".npz")]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}

    out = {}
    gen = load(store, shards)
    if ecfg.inception_score and "logits_unbiased" in gen:
        out["inception_score"], out["inception_score_std"] = inception_score(gen["logits_unbiased"])
    if ecfg.precision_recall and reference is not None and gen:
        ref = load(reference, reference.done_shards(MARKERS))
        if ref:
            out["precision"], out["recall"] = precision_recall(gen["2048"], ref["2048"])
    return out


def evaluate_target(cfg: RunConfig, ev: ShardStore, target: Target, prompts_url: str, prompts: pa.Table,
                    n: int) -> tuple[dict, dict]:
    """Sample and measure one checkpoint; returns its metrics row and its failed shards."""
    ecfg = cfg.eval
    res = _resolution(ecfg, target)
    store = ShardStore(ev.url(target.label))
    ranges = shard_ranges(n, ecfg.shard_size)
    sampling = ecfg.model_dump(include={"images_per_prompt", "cfg_scale", "temperature", "top_k", "top_p", "seed",
                                        "batch_size", "vq", "text_encoder", "clip", "inception", "shard_size",
                                        "protocol", "caption_clean", "inception_score", "precision_recall",
                                        "reference_stats", "text_rope", "model"})
    fp = fingerprint(target.checkpoint, target.untrained, prompts_url, n, res, sampling,
                     READER if has_truth(prompts) else None)
    start = time.perf_counter()
    run = map_shards(store, list(ranges), SampleWorker,
                     {"target": target.__dict__, "prompts_url": prompts_url, "ranges": ranges,
                      "ecfg": ecfg, "models_root": cfg.models_root, "reader_cache": ev.url("reader")}, fp, ecfg,
                     desc=f"eval: sampling {target.label}")
    row = {"label": target.label, "stage": target.stage, "step": target.step, "checkpoint": target.checkpoint,
           "resolution": res, "fingerprint": fp, **_prompt_metrics(list(run.done.values()))}
    proto = eval_protocol(ecfg.protocol)
    reference = reference_moments(cfg, ev, prompts, proto.resolution or res)
    if "failed" in reference:  # FID fails with the shards named: the row has no figure against part of the set
        row["fid_error"] = failed_reference(reference["failed"])
    for name, key in (("clip", "clip_feature_frechet"), ("inception", "fid")):
        gen = merged(store, "moments", f".{name}.npz", run.done)
        ref = reference.get(name)
        if gen is not None and ref is not None and gen.count > 1 and (isinstance(ref, Gaussian) or ref.count > 1):
            row[key] = frechet_distance(gen, ref)
    row.update(_protocol_fields(cfg, row, reference, res))
    if "prompt_following" in row:  # what a reader ignoring the images would score, beside each figure
        for attr, floor in chance_floors(prompts.slice(0, n).to_pylist()).items():
            row["prompt_following_chance" if attr == "all" else f"prompt_following_{attr}_chance"] = floor
    if ecfg.inception and (ecfg.inception_score or ecfg.precision_recall):
        ref_store = (ShardStore(ev.url("reference", str(proto.resolution or res)))
                     if reference and not ecfg.reference_stats and "failed" not in reference else None)
        row.update(_inception_extras(ecfg, store, run.done, ref_store))
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["failed_shards"] = len(run.failed)
    failed = dict(run.failed)
    failed.update({f"reference/{shard}": error for shard, error in reference.get("failed", {}).items()})
    return row, failed


def _protocol_fields(cfg: RunConfig, row: dict, reference: dict, res: int) -> dict:
    """Protocol, resolution measured at, N_gen, N_ref and the feature extractor with its weights' sha256."""
    ecfg = cfg.eval
    ref = reference.get("inception" if ecfg.inception else "clip")
    extractor = "inception-v3 (torch-fidelity), clean-fid resize" if ecfg.inception else f"CLIP {ecfg.clip.model}"
    weights = resolve(ecfg.inception or ecfg.clip.checkpoint, cfg.models_root)
    digest = weights_sha256(weights) if weights else None
    return row_fields(eval_protocol(ecfg.protocol), res, row.get("images", 0), ref.count if ref is not None else 0,
                      extractor, digest, ecfg.clip.model, row.get("label", ""))


def evaluate_tokenizer(cfg: RunConfig, ev: ShardStore, prompts: pa.Table) -> list[dict]:
    """rFID (on the configured features), PSNR, SSIM and codebook usage of the VQ, per resolution."""
    ecfg, tcfg = cfg.eval, cfg.eval.tokenizer
    urls = image_list(cfg, tcfg.images, prompts, tcfg.max_images)
    if not tcfg.enabled or not urls:
        return []
    store = ShardStore(ev.url("tokenizer"))
    list_url = _write_list(store, urls, "images.parquet")
    ranges = shard_ranges(len(urls), ecfg.shard_size)
    resolutions = sorted(set(tcfg.resolutions))
    fp = fingerprint(urls[:3], len(urls), resolutions, tcfg.vq or ecfg.vq, ecfg.clip.model_dump(), ecfg.inception)
    run = map_shards(store, list(ranges), ImageWorker,
                     {"list_url": list_url, "ranges": ranges, "ecfg": ecfg, "models_root": cfg.models_root,
                      "resolutions": resolutions, "tokenizer": True},
                     fp, ecfg, desc="eval: tokenizer images")
    summaries = list(run.done.values())
    images = sum(s["images"] for s in summaries)
    out = []
    for res in resolutions:
        sums = [s[str(res)] for s in summaries if str(res) in s]
        counts = None
        for data in shard_files(store, f"{res}/codes", run.done, ".npy"):
            c = np.load(io.BytesIO(data))
            counts = c if counts is None else counts + c
        row = {"resolution": res, "images": images,
               "psnr": sum(s["psnr_sum"] for s in sums) / max(images, 1),
               "ssim": sum(s["ssim_sum"] for s in sums) / max(images, 1),
               "codebook_usage": float((counts > 0).mean()) if counts is not None else 0.0,
               "codes_counted": int(counts.sum()) if counts is not None else 0,
               "usage_cap": usage_cap(int(counts.sum()), len(counts)) if counts is not None else 0.0,
               "unreadable": sum(s.get("unreadable", 0) for s in summaries)}
        for name, key in (("clip", "rfid_clip_features"), ("inception", "rfid")):
            a = merged(store, f"{res}/original/moments", f".{name}.npz", run.done)
            b = merged(store, f"{res}/reconstructed/moments", f".{name}.npz", run.done)
            if a is not None and b is not None and a.count > 1:
                row[key] = frechet_distance(a, b)
        out.append(row)
    return out


def run(cfg: RunConfig, run_name: str | None = None, checkpoints: list[str] | None = None,
        tokenizer: bool = True) -> EvalResult:
    """Evaluate the checkpoints (default: the config's `eval.checkpoints`) and the tokenizer."""

    if cfg.eval is None:
        raise ValueError("the config has no `eval` section")
    ecfg = cfg.eval
    run_name = run_name or cfg.name
    ev = ShardStore(stage_dir(cfg.runs_root, run_name, "eval"))
    pstore, pname = prompt_store(cfg)
    prompts = read_prompt_set(pstore, pname)
    n = min(prompts.num_rows, ecfg.max_prompts or prompts.num_rows)
    if has_truth(prompts):
        log.info("eval: %d prompts with known truth: prompt-following is measured.", n)
    init_ray(cfg.ray)
    rows, failed = [], {}
    for target in targets(cfg, run_name, checkpoints or ecfg.checkpoints):
        log.info("eval: %s (%s), %d prompts x %d images.", target.label, target.checkpoint, n, ecfg.images_per_prompt)
        row, bad = evaluate_target(cfg, ev, target, pstore.url(pname), prompts, n)
        append_metrics(ev, row)
        write_tensorboard(ev, row)
        rows.append(row)
        if bad:
            failed[target.label] = bad
    history = read_metrics(ev)
    labels = [r["label"] for r in history]
    page = write_page(ev, labels, prompts, min(ecfg.html_prompts, n)) if labels else None
    tok = evaluate_tokenizer(cfg, ev, prompts) if tokenizer else []
    if tok:
        ev.write_json(tok, "tokenizer", "metrics.json")
    return EvalResult(rows=rows, history=history, tokenizer=tok, page=page, metrics_file=ev.url("metrics.jsonl"),
                      failed=failed)
