"""The caption stage: a LLaVA caption for every kept sample, on Ray Data model actors.

For every selected shard (select/{shard}.done), the kept samples (keep true in scores/) are read
from download/{shard}.tar, decoded, and captioned in batches by a pool of model actors (one per
GPU, or per CPU slot). Each generated caption is checked (caption_checks); one that fails, or
an image that cannot be decoded, falls back to the sample's original caption with the reason.
The driver writes captions/{shard}.parquet (sorted by key):
  key, caption_long, caption_short (its first sentence), captioner, prompt,
  generation (the settings, JSON), fallback_reason ("" when the generated caption is used)
then the marker caption/{shard}.done with the shard's counts. Every kept sample gets one row.
"""
from __future__ import annotations

import json
import logging
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from tessera.config.caption import CaptionConfig
from tessera.config.ray import RayConfig
from tessera.pipelines.caption_checks import check, first_sentence
from tessera.pipelines.score import decode_image
from tessera.pipelines.store import ShardStore
from tessera.pipelines.tokenize import _kept_count, _read_tar, input_shards

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
class CaptionResult:
    rows_in: int
    captioned: int
    fallback: dict[str, int]
    shards: int

    def funnel(self) -> list[dict]:
        rows = [{"stage": STAGE, "outcome": CAPTIONED, "reason": "", "count": self.captioned}]
        return rows + [{"stage": STAGE, "outcome": FALLBACK, "reason": r, "count": n}
                       for r, n in sorted(self.fallback.items())]


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
def read_kept(item: dict, store: ShardStore) -> list[dict]:
    """One row per kept sample of a shard: key, image bytes (b"" when missing), original caption."""
    shard = item["shard"]
    scores = store.read_table("scores", f"{shard}.parquet", columns=["key", "keep"]).to_pylist()
    keys = [r["key"] for r in scores if r["keep"]]
    members, _ = _read_tar(store, shard, set(keys))
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
        rows.append({"shard": shard, "key": key, "image": image, "caption": caption})
    return rows


# Generating ----------------------------------------------------------------------------------
class TransformersCaptioner:
    """LlavaForConditionalGeneration on one device: batched, left-padded generation."""

    def __init__(self, cfg: CaptionConfig, model_path: str, device: str):
        import torch

        from tessera.models.llava import load_llava, prompt_text

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
        from tessera.pipelines.vllm_backend import VllmCaptioner

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


class CaptionActor:
    """One model replica in Ray Data's actor pool: decodes a batch, captions it, checks each caption."""

    def __init__(self, cfg: CaptionConfig, model_path: str, device: str, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.cfg = cfg
        self.captioner = make_captioner(cfg, model_path, device)

    def _generate(self, images: list, keys: list[str]) -> list[str | None]:
        try:
            return list(self.captioner.generate(images, keys))
        except Exception as e:  # noqa: BLE001 - retry one by one so one bad image cannot sink the batch
            if len(images) == 1:
                log.warning("Captioning %s failed: %s", keys[0], e)
                return [None]
            return [t for i in range(len(images)) for t in self._generate(images[i:i + 1], keys[i:i + 1])]

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        keys = [str(k) for k in batch["key"]]
        images, reasons = [], [""] * n
        for i in range(n):
            img, reasons[i] = decode_image(batch["image"][i])
            images.append(img)
        ok = [i for i in range(n) if not reasons[i]]
        generated: list[str | None] = [None] * n
        if ok:
            for i, text in zip(ok, self._generate([images[i] for i in ok], [keys[i] for i in ok])):
                generated[i] = text
                if text is None:
                    reasons[i] = GENERATION_ERROR
        results = [finish_caption(generated[i], str(batch["caption"][i]), reasons[i], self.cfg) for i in range(n)]
        return {"shard": batch["shard"], "key": batch["key"],
                "caption_long": np.array([r[0] for r in results], dtype=object),
                "caption_short": np.array([r[1] for r in results], dtype=object),
                "fallback_reason": np.array([r[2] for r in results], dtype=object)}


# Writing a shard ------------------------------------------------------------------------------
def write_shard(store: ShardStore, shard: str, rows: list[dict], captioner: str, prompt: str,
                settings: dict) -> dict:
    """Write captions/{shard}.parquet (sorted by key), then the marker with the shard's counts."""
    rows = sorted(rows, key=lambda r: str(r["key"]))
    generation = json.dumps(settings, sort_keys=True)
    table = pa.Table.from_pylist([
        {"key": str(r["key"]), "caption_long": str(r["caption_long"]), "caption_short": str(r["caption_short"]),
         "captioner": captioner, "prompt": prompt, "generation": generation,
         "fallback_reason": str(r["fallback_reason"])} for r in rows], schema=SCHEMA)
    store.write_table(table, OUTPUT, f"{shard}.parquet")
    fallback = Counter(str(r["fallback_reason"]) for r in rows if r["fallback_reason"])
    info = {"rows_in": len(rows), "captioned": len(rows) - sum(fallback.values()), "fallback": dict(fallback)}
    store.mark_done(STAGE, shard, info)
    return info


# The stage --------------------------------------------------------------------------------------
def run(cfg: CaptionConfig, ray_cfg: RayConfig, store: ShardStore, models_root: str,
        on_shard=None) -> CaptionResult:
    """Caption every selected shard not yet captioned; return counts over all shards."""
    shards = input_shards(store)
    if not shards:
        raise ValueError(f"{store.root}: no selected shards to caption (run score and select first)")
    if cfg.backend == "vllm":
        from tessera.pipelines.vllm_backend import require_vllm

        require_vllm()
    for folder in (OUTPUT, STAGE):
        store.clear_temporaries(folder)
    todo = [s for s in shards if not store.is_done(STAGE, s)]
    log.info("Caption: %d of %d shards to do with %s (%d already done).", len(todo), len(shards), cfg.model,
             len(shards) - len(todo))
    if todo:
        _caption(cfg, ray_cfg, store, models_root, todo, on_shard)
    return summarize(store, shards)


def num_actors(cfg: CaptionConfig) -> int:
    """The configured pool size, or one actor per GPU (per CPU slot, less one, without GPUs)."""
    if cfg.num_actors:
        return cfg.num_actors
    import ray

    resources = ray.cluster_resources()
    if cfg.num_gpus_per_actor > 0:
        return max(1, int(resources.get("GPU", 0) // cfg.num_gpus_per_actor))
    # One CPU stays free for the tasks that read and decode shards (actors hold theirs for good).
    return max(1, int((resources.get("CPU", 1) - 1) // cfg.num_cpus_per_actor))


def _caption(cfg: CaptionConfig, ray_cfg: RayConfig, store: ShardStore, models_root: str,
             todo: list[str], on_shard) -> None:
    import ray
    from tqdm.auto import tqdm

    from tessera.models.tiny import resolve
    from tessera.pipelines.raytools import init_ray

    model_path = resolve(cfg.model, models_root)
    device = "cuda" if cfg.num_gpus_per_actor > 0 else "cpu"
    settings = generation_settings(cfg, device)
    init_ray(ray_cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images
    expected = {s: _kept_count(store, s) for s in todo}
    actors = num_actors(cfg)

    def finish(shard: str, rows: list[dict]) -> None:
        write_shard(store, shard, rows, cfg.model, cfg.prompt, settings)
        if on_shard:
            on_shard(shard)

    with tqdm(total=sum(expected.values()), desc=STAGE, unit="img") as bar:
        for start in range(0, len(todo), cfg.shards_per_pass):
            chunk = todo[start:start + cfg.shards_per_pass]
            pending: dict[str, list[dict]] = {s: [] for s in chunk}
            for shard in [s for s in chunk if expected[s] == 0]:
                finish(shard, pending.pop(shard))
            if not pending:
                continue
            ds = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending))
            ds = ds.flat_map(read_kept, fn_kwargs={"store": store})
            ds = ds.map_batches(CaptionActor, batch_size=cfg.batch_size, batch_format="numpy",
                                fn_constructor_kwargs={"cfg": cfg, "model_path": model_path, "device": device,
                                                       "threads": int(cfg.num_cpus_per_actor)},
                                compute=ray.data.ActorPoolStrategy(size=actors),
                                num_gpus=cfg.num_gpus_per_actor or None, num_cpus=cfg.num_cpus_per_actor)
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for i in range(len(out["key"])):
                    row = {c: out[c][i] for c in out}
                    shard = str(row["shard"])
                    pending[shard].append(row)
                    if len(pending[shard]) == expected[shard]:
                        finish(shard, pending.pop(shard))
                bar.update(len(out["key"]))
            for shard, rows in pending.items():
                raise RuntimeError(f"shard {shard}: {len(rows)} of {expected[shard]} kept samples came back")


def summarize(store: ShardStore, shards: list[str]) -> CaptionResult:
    infos = [store.done_info(STAGE, s) for s in shards if store.is_done(STAGE, s)]
    fallback: Counter = Counter()
    for info in infos:
        fallback.update(info["fallback"])
    return CaptionResult(rows_in=sum(i["rows_in"] for i in infos), captioned=sum(i["captioned"] for i in infos),
                         fallback=dict(fallback), shards=len(infos))
