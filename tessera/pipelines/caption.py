"""The caption stage: a LLaVA caption for every kept sample, on model actors.

For every selected shard (select/{shard}.done), a model actor (one per GPU, or per CPU slot; the
stage runtime) reads the kept samples (keep true in select/{shard}.parquet) from download/{shard}.tar, decodes
and captions them in batches, and checks each caption (caption_checks); one that fails, or an
image that cannot be decoded, falls back to the sample's original caption with the reason. The
actor writes captions/{shard}.parquet (sorted by key):
  key, caption_long, caption_short (its first sentence), captioner, prompt,
  generation (the settings, JSON), fallback_reason ("" when the generated caption is used)
and the runtime the marker caption/{shard}.done with the shard's counts, its fingerprint (its
selection's decisions and the captioner's settings) and the selection it belongs to. A
re-selection redoes exactly the shards whose kept samples changed. Every kept sample gets one row.
"""
from __future__ import annotations

import hashlib
import json
import logging
import zlib
from collections import Counter
from dataclasses import dataclass

import pyarrow as pa

from tessera.config.caption import CaptionConfig
from tessera.config.ray import RayConfig
from tessera.core import runtime
from tessera.core.funnel import StageResult, by_reason
from tessera.core.lineage import (
    input_shards,
    kept_counts,
    read_decisions,
    selection_id,
    shard_fingerprints,
)
from tessera.core.raytools import init_ray
from tessera.core.stage import Stage
from tessera.core.store import ShardStore
from tessera.models.llava import load_llava, prompt_text
from tessera.models.refs import build_of, resolve
from tessera.pipelines.caption_checks import check, first_sentence
from tessera.pipelines.intake import read_samples
from tessera.pipelines.score import decode_image
from tessera.pipelines.vllm_backend import VllmCaptioner, require_vllm

log = logging.getLogger(__name__)
STAGE = "caption"
OUTPUT = "captions"
CAPTIONED = "captioned"
FALLBACK = "fallback"
GENERATION_ERROR = "generation_error"
SCHEMA = pa.schema([("key", pa.string()), ("caption_long", pa.string()), ("caption_short", pa.string()),
                    ("captioner", pa.string()), ("prompt", pa.string()), ("generation", pa.string()),
                    ("fallback_reason", pa.string())])


@dataclass
class CaptionResult(StageResult):
    rows_in: int
    captioned: int
    fallback: dict[str, int]
    shards: int

    def outcomes(self) -> list[tuple[str, str, str, int]]:
        return [(STAGE, CAPTIONED, "", self.captioned), *by_reason(STAGE, FALLBACK, self.fallback)]


def generation_settings(cfg: CaptionConfig, device: str) -> dict:
    """What decides the captions besides the model and prompt (stored with every row)."""
    settings = {"backend": cfg.backend, "max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample,
                "dtype": "bfloat16" if device == "cuda" and cfg.precision == "bf16" else "float32"}
    if cfg.do_sample:
        settings.update(temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed)
    if cfg.backend == "transformers":
        settings["batch_size"] = cfg.batch_size  # batching can change the last bits of the logits
    return settings


# Reading a shard ------------------------------------------------------------------------------
def read_kept(store: ShardStore, shard: str) -> list[dict]:
    """One row per kept sample of a shard: key, image bytes (b"" when missing), original caption."""
    decisions = read_decisions(store, shard).select(["key", "keep"]).to_pylist()
    keys = [r["key"] for r in decisions if r["keep"]]
    members = read_samples(store, shard, set(keys))
    rows = []
    for key in keys:
        files = members.get(key, {})
        caption = files["txt"].decode("utf-8", "replace") if "txt" in files else ""
        if not caption and "json" in files:
            try:
                caption = json.loads(files["json"]).get("caption") or ""
            except (ValueError, AttributeError):
                pass
        image = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), b"")
        rows.append({"key": key, "image": image, "caption": caption})
    return rows


# Generating ----------------------------------------------------------------------------------
class TransformersCaptioner:
    """LlavaForConditionalGeneration on one device: batched, left-padded generation."""

    def __init__(self, cfg: CaptionConfig, model_path: str, device: str):
        import torch


        self.cfg, self.device = cfg, device
        dtype = torch.bfloat16 if device == "cuda" and cfg.precision == "bf16" else torch.float32
        self.model, self.processor = load_llava(model_path, device, dtype)
        self.text = prompt_text(self.processor, cfg.prompt, cfg.prompt_template)
        self.dtype = dtype

    def generate(self, images: list, keys: list[str]) -> list[str]:
        import torch

        inputs = self.processor(images=images, text=[self.text] * len(images), return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        kwargs = {"max_new_tokens": self.cfg.max_new_tokens, "do_sample": self.cfg.do_sample,
                  "pad_token_id": self.processor.tokenizer.pad_token_id}
        if self.cfg.do_sample:
            kwargs.update(temperature=self.cfg.temperature, top_p=self.cfg.top_p)
            # Seeded by the batch's keys: the same batches sample the same captions.
            torch.manual_seed(self.cfg.seed + zlib.crc32("".join(keys).encode()))
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs)
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def make_captioner(cfg: CaptionConfig, model_path: str, device: str):
    if cfg.backend == "vllm":
        return VllmCaptioner(cfg, model_path)
    return TransformersCaptioner(cfg, model_path, device)


def finish_caption(generated: str | None, original: str, reason: str, cfg: CaptionConfig) -> tuple[str, str, str]:
    """(caption_long, caption_short, fallback_reason) from a generation (None when there was none)."""
    if generated is not None and not reason:
        generated = generated.strip()
        reason = check(generated, cfg.prompt, cfg.repetition_ngram, cfg.max_repetition)
        if not reason:
            return generated, first_sentence(generated), ""
    original = (original or "").strip()
    return original, first_sentence(original), reason


class CaptionShard:
    """A model actor's work: holds one captioner, captions the kept samples of one shard per call.

    Each generated caption is checked; one that fails, or an image that cannot be decoded, falls
    back to the original caption with the reason."""

    def __init__(self, cfg: CaptionConfig, model_path: str, device: str, settings: dict):
        self.cfg, self.settings = cfg, settings
        self.captioner = make_captioner(cfg, model_path, device)

    def _generate(self, images: list, keys: list[str]) -> list[str | None]:
        try:
            return list(self.captioner.generate(images, keys))
        except Exception as e:  # noqa: BLE001 - retry one by one so one bad image cannot sink the batch
            if len(images) == 1:
                log.warning("Captioning %s failed: %s", keys[0], e)
                return [None]
            return [t for i in range(len(images)) for t in self._generate(images[i:i + 1], keys[i:i + 1])]

    def caption_batch(self, batch: list[dict]) -> list[dict]:
        images, reasons = [], []
        for sample in batch:
            img, reason = decode_image(sample["image"])
            images.append(img)
            reasons.append(reason)
        ok = [i for i, r in enumerate(reasons) if not r]
        generated: list[str | None] = [None] * len(batch)
        if ok:
            texts = self._generate([images[i] for i in ok], [batch[i]["key"] for i in ok])
            for i, text in zip(ok, texts):
                generated[i] = text
                if text is None:
                    reasons[i] = GENERATION_ERROR
        rows = []
        for sample, text, reason in zip(batch, generated, reasons):
            long, short, fallback = finish_caption(text, sample["caption"], reason, self.cfg)
            rows.append({"key": sample["key"], "caption_long": long, "caption_short": short,
                         "fallback_reason": fallback})
        return rows

    def __call__(self, store: ShardStore, shard: str) -> dict:
        samples = read_kept(store, shard)
        size = self.cfg.batch_size
        rows = [r for i in range(0, len(samples), size) for r in self.caption_batch(samples[i:i + size])]
        return write_shard(store, shard, rows, self.cfg.model, self.cfg.prompt, self.settings)


# Writing a shard ------------------------------------------------------------------------------
def write_shard(store: ShardStore, shard: str, rows: list[dict], captioner: str, prompt: str,
                settings: dict) -> dict:
    """Write captions/{shard}.parquet (sorted by key); returns the shard's counts."""
    rows = sorted(rows, key=lambda r: r["key"])
    generation = json.dumps(settings, sort_keys=True)
    table = pa.Table.from_pylist([
        {"key": r["key"], "caption_long": r["caption_long"], "caption_short": r["caption_short"],
         "captioner": captioner, "prompt": prompt, "generation": generation,
         "fallback_reason": r["fallback_reason"]} for r in rows], schema=SCHEMA)
    store.write_table(table, OUTPUT, f"{shard}.parquet")
    fallback = Counter(r["fallback_reason"] for r in rows if r["fallback_reason"])
    return {"rows_in": len(rows), "captioned": len(rows) - sum(fallback.values()), "fallback": dict(fallback)}


# The stage --------------------------------------------------------------------------------------
def lineage(cfg: CaptionConfig, model_path: str, settings: dict) -> str:
    """What decides a shard's captions besides its selection."""

    blob = json.dumps({"model": cfg.model, "path": model_path, "build": build_of(model_path), "prompt": cfg.prompt,
                       "template": cfg.prompt_template, "settings": settings,
                       "checks": [cfg.repetition_ngram, cfg.max_repetition]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run(cfg: CaptionConfig, ray_cfg: RayConfig, store: ShardStore, models_root: str,
        on_shard=None) -> CaptionResult:
    """Caption every selected shard not yet captioned for its current selection; return counts over all shards."""

    shards = input_shards(store)
    if not shards:
        raise ValueError(f"{store.root}: no selected shards to caption (run score and select first)")
    if cfg.backend == "vllm":
        require_vllm()
    model_path = resolve(cfg.model, models_root)
    device = "cuda" if cfg.num_gpus_per_actor > 0 else "cpu"
    settings = generation_settings(cfg, device)
    init_ray(ray_cfg)
    ran = runtime.run_stage(
        STEP.name, store, shards, STEP.work,
        kwargs={"cfg": cfg, "model_path": model_path, "device": device, "settings": settings},
        fingerprints=shard_fingerprints(store, shards, lineage(cfg, model_path, settings)),
        stamp={"selection": selection_id(store)}, num_cpus=cfg.num_cpus_per_actor,
        num_gpus=cfg.num_gpus_per_actor, actors=num_actors(cfg), retries=cfg.shard_retries,
        outputs=STEP.outputs, on_shard=on_shard)
    return summarize(store, shards, ran.failed)


def num_actors(cfg: CaptionConfig) -> int:
    """The configured pool size, or one actor per GPU (per CPU slot without GPUs)."""
    if cfg.num_actors:
        return cfg.num_actors
    import ray

    resources = ray.cluster_resources()
    if cfg.num_gpus_per_actor > 0:
        return max(1, int(resources.get("GPU", 0) // cfg.num_gpus_per_actor))
    return max(1, int(resources.get("CPU", 1) // cfg.num_cpus_per_actor))


STEP = Stage(STAGE, inputs=("download", "select"), outputs=(OUTPUT,), work=CaptionShard, result=CaptionResult)


def summarize(store: ShardStore, shards: list[str], failed: dict[str, str]) -> CaptionResult:
    markers = store.markers(STAGE, fields=("rows_in", "captioned", "fallback"))
    infos = [markers[s] for s in shards if s not in failed]
    fallback: Counter = Counter()
    for info in infos:
        fallback.update(info["fallback"])
    lost = kept_counts(store, failed)
    return CaptionResult(rows_in=sum(i["rows_in"] for i in infos) + lost,
                         captioned=sum(i["captioned"] for i in infos), fallback=dict(fallback),
                         shards=len(infos), failed=failed, failed_rows=lost)
