"""One command for a GPU node: training, sampling and scoring figures in under 10 minutes.

    python -m bench.gpu [--llamagen-src DIR] [--out bench-gpu.json]      # make bench-gpu
    python -m bench.gpu --device cpu --tiny                             # a smoke run anywhere

- Training steps of GPT-B and GPT-XL at 256 and 512px (random weights, bf16, stored-feature
  batches): image tokens/s, MFU, peak memory against `tessera plan`'s estimate, with and without
  activation checkpointing and FlexAttention (compiled per block).
- GPT-XL sampling tokens/s (KV cache, CFG) against LlamaGen's own sampler (`--llamagen-src`).
- Scoring images/s with the CLIP ViT-L/14 architecture (random weights, bf16).
Each case reports an error instead of stopping the run (an out-of-memory case says so).
"""
from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

# (model, resolution, micro-batch, activation checkpointing, attention, compile)
TRAIN_CASES = [
    ("GPT-B", 256, 32, "off", "sdpa", False),
    ("GPT-B", 256, 32, "off", "flex", True),
    ("GPT-XL", 256, 32, "off", "sdpa", False),
    ("GPT-XL", 256, 32, "selective", "flex", True),
    ("GPT-XL", 512, 8, "off", "sdpa", False),
    ("GPT-XL", 512, 16, "selective", "flex", True),
    ("GPT-XL", 512, 32, "full", "flex", True),
]
TINY_TRAIN_CASES = [
    ("GPT-nano", 256, 2, "off", "sdpa", False),
    ("GPT-nano", 256, 2, "full", "sdpa", False),
    ("GPT-nano", 256, 2, "selective", "sdpa", False),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device: torch.device) -> float:
    from tessera.training.loop import PEAK_TFLOPS

    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), 0.0)


def train_case(model_name: str, res: int, micro: int, ac: str, attention: str, compile_: bool,
               device: torch.device, steps: int, warmup: int) -> dict:
    from tessera.config.train import TrainConfig
    from tessera.models.gpt import GPT, flops_per_token, gpt_config
    from tessera.training.parallel import Dist, parallelize
    from tessera.training.plan import estimate
    from tessera.training.step import build_optimizer, train_step

    cfg = gpt_config(model_name)
    grid = res // 16
    tcfg = TrainConfig(model=model_name, global_batch=micro, activation_checkpointing=ac, attention=attention,
                       compile=compile_, bf16=device.type == "cuda")
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(cfg, grid=grid)
    model = parallelize(model, tcfg, Dist(device=device))
    opt = build_optimizer(model, tcfg, device)
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(micro, 120, dtype=torch.bool)
    for i in range(micro):
        mask[i, 120 - (10 + 13 * i) % 120:] = True
    batch = {"codes": torch.randint(0, cfg.vocab_size, (micro, grid * grid), generator=g),
             "cond": torch.randn(micro, 120, cfg.caption_dim, generator=g), "cond_mask": mask,
             "valid": torch.ones(micro, dtype=torch.bool)}
    if device.type == "cuda":
        batch = {k: v.pin_memory() for k, v in batch.items()}
        torch.cuda.reset_peak_memory_stats(device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    start = time.perf_counter()
    for _ in range(warmup):
        train_step(model, opt, [batch], device=device, autocast_dtype=autocast)
    sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        out = train_step(model, opt, [batch], device=device, autocast_dtype=autocast)
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    tokens_per_s = micro * grid * grid / seconds
    positions = 120 + grid * grid
    peak = peak_tflops(device)
    plan = estimate(cfg, resolution=res, micro_batch=micro, checkpointing=ac, bf16=device.type == "cuda")
    measured = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")
    return {"model": model_name, "res": res, "micro_batch": micro, "checkpointing": ac, "attention": attention,
            "compile": compile_, "step_s": seconds, "warmup_s": first, "image_tokens_per_s": tokens_per_s,
            "mfu": (flops_per_token(cfg, positions) * micro * positions / seconds / (peak * 1e12)) if peak else None,
            "peak_gib": measured / 2**30, "plan_gib": plan.total / 2**30, "loss": float(out["loss"])}


def sample_case(llamagen_src: str | None, model_name: str, res: int, batch: int, device: torch.device) -> dict:
    from tessera.models.gpt import build_gpt
    from tessera.models.generation import generate

    grid = res // 16
    torch.manual_seed(0)
    ours = build_gpt(model_name, grid=grid, device=device, text_rope="llamagen").eval()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ours.to(dtype)
    cond = torch.randn(batch, 120, ours.cfg.caption_dim, device=device, dtype=dtype)
    mask = torch.ones(batch, 120, dtype=torch.bool, device=device)
    mask[:, :60] = False
    n = batch * grid * grid
    generate(ours, cond[:1], mask[:1], cfg_scale=7.5)  # warm-up
    sync(device)
    start = time.perf_counter()
    generate(ours, cond, mask, cfg_scale=7.5)
    sync(device)
    result = {"model": model_name, "res": res, "batch": batch, "tessera_tokens_per_s": n / (time.perf_counter() - start)}
    if llamagen_src:
        from bench.vs_llamagen import import_llamagen

        build_theirs, _, their_generate, _ = import_llamagen(llamagen_src)
        theirs = build_theirs(ours.cfg, grid).to(device)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        theirs.to(dtype).eval()
        their_generate(theirs, cond[:1], grid * grid, emb_masks=mask[:1], cfg_scale=7.5, top_k=1000)
        sync(device)
        start = time.perf_counter()
        their_generate(theirs, cond, grid * grid, emb_masks=mask, cfg_scale=7.5, top_k=1000)
        sync(device)
        result["llamagen_tokens_per_s"] = n / (time.perf_counter() - start)
        result["ratio"] = result["tessera_tokens_per_s"] / result["llamagen_tokens_per_s"]
    return result


def score_case(arch: str, batch: int, device: torch.device, steps: int) -> dict:
    import open_clip

    model = open_clip.create_model(arch, pretrained=None).to(device).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    x = torch.randn(batch, 3, size, size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.inference_mode(), autocast:
        model.encode_image(x)
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            model.encode_image(x)
        sync(device)
    return {"arch": arch, "batch": batch, "images_per_s": batch * steps / (time.perf_counter() - start)}


def run(name: str, fn, results: list, *args) -> None:
    print(f"-- {name} ...", flush=True)
    try:
        row = fn(*args)
    except Exception as e:  # noqa: BLE001 - one failed case (an OOM) must not stop the others
        row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        traceback.print_exc()
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    row["case"] = name
    print("   " + json.dumps(row), flush=True)
    results.append(row)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes: a smoke run on any device")
    parser.add_argument("--llamagen-src", default=None, help="a LlamaGen checkout, for their sampler")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--only", choices=["train", "sample", "score"], action="append",
                        help="run only these parts (repeatable)")
    parser.add_argument("--out", default="bench-gpu.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: pass --device cpu (and --tiny) for a smoke run")
        torch.backends.cuda.matmul.allow_tf32 = True
    parts = set(args.only or ["train", "sample", "score"])
    results: list[dict] = []
    if "train" in parts:
        for case in (TINY_TRAIN_CASES if args.tiny else TRAIN_CASES):
            model, res, micro, ac, attention, compile_ = case
            run(f"train {model} {res}px mb{micro} ac={ac} {attention}{' compiled' if compile_ else ''}",
                train_case, results, *case, device, args.steps, args.warmup)
    if "sample" in parts:
        model, res, batch = ("GPT-nano", 256, 1) if args.tiny else ("GPT-XL", 256, 8)
        run(f"sample {model} {res}px batch {batch}", sample_case, results, args.llamagen_src, model, res, batch, device)
    if "score" in parts:
        arch, batch = ("ViT-B-32", 2) if args.tiny else ("ViT-L-14", 128)
        run(f"score CLIP {arch} batch {batch}", score_case, results, arch, batch, device, args.steps)
    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "tiny": args.tiny}
    with open(args.out, "w") as f:
        json.dump({**header, "results": results}, f, indent=2)
    print(f"Wrote {args.out}.")
    return results


if __name__ == "__main__":
    main()
