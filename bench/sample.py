"""Sampling throughput: generation with the KV cache against without it, same model, same run.

Without the cache every new token reruns the whole sequence (the text prefix and every code so
far); with it the prefix runs once and each step feeds one token. Both use CFG (a doubled batch).

    python -m bench.sample [--model GPT-tiny] [--res 256] [--batch 4] [--device cuda]

Random weights: the speed does not depend on them. Both sides decode greedily, so they must
produce the same tokens, which is checked.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="GPT-tiny")
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cfg-scale", type=float, default=7.5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from tessera.models.gpt import build_gpt
    from tessera.models.generation import generate

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = build_gpt(args.model, grid=args.res // 16, device=device).to(dtype)
    model.set_grid(model.grid)  # the RoPE table stays in fp32
    torch.nn.init.normal_(model.output.weight, std=0.02)
    cond = torch.randn(args.batch, 120, model.cfg.caption_dim, device=device, dtype=dtype)
    mask = torch.ones(args.batch, 120, dtype=torch.bool, device=device)
    mask[:, :60] = False

    def timed(use_cache: bool) -> tuple[float, torch.Tensor]:
        generate(model, cond[:1], mask[:1], cfg_scale=args.cfg_scale, temperature=0, use_cache=use_cache)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = generate(model, cond, mask, cfg_scale=args.cfg_scale, temperature=0, use_cache=use_cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return tokens.numel() / (time.perf_counter() - start), tokens

    cached, a = timed(True)
    plain, b = timed(False)
    print(f"model {args.model}, {args.res}px ({model.num_image_tokens} tokens/image), batch {args.batch} "
          f"with CFG, {args.device}, same tokens: {torch.equal(a, b)}")
    print(f"  with KV cache:     {cached:10.1f} image tokens/s")
    print(f"  without KV cache:  {plain:10.1f} image tokens/s")
    print(f"  ratio: {cached / plain:.2f}x")


if __name__ == "__main__":
    main()
