"""Training throughput: from pre-tokenized code shards against LlamaGen's way, same model, same run.

Both sides train the same GPT with the same batch, optimizer and stored caption features. Ours
streams {key}.codes.npy from tokens/{res} shards; the baseline does what LlamaGen's t2i training
does: decode the JPEG, normalise it and run the VQ encoder on every image at every step.

    python -m bench.train [--model GPT-tiny] [--vq tiny|VQ-16] [--res 256] [--batch 8] [--steps 10]

`--vq VQ-16` times the full-size LlamaGen tokenizer architecture (random weights: the speed does
not depend on them); `--vq tiny` the demo's. Use --device cuda on a GPU.
"""
from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
import torch


def make_data(root: str, n: int, res: int, vq, text_encoder, device) -> list[tuple[bytes, np.ndarray]]:
    """JPEGs of the synthetic set and their code shard (encoded once here, as the tokenize stage does)."""
    from tessera.core.token_shards import write_codes_shard
    from tessera.core.store import ShardStore
    from tessera.demo.synthetic import draw, picture

    jpegs, samples = [], []
    for i in range(n):
        p = picture(i, 0)
        img = draw(p).convert("RGB").resize((res, res))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        feats = text_encoder.encode([p.caption])[0].cpu().numpy().astype(np.float16)
        jpegs.append((buf.getvalue(), feats))
        with torch.no_grad():
            codes = vq.encode(to_pixels([buf.getvalue()], device))[0].cpu().numpy()
        samples.append({"key": f"{i:09d}", "codes": codes, "t5": feats, "meta": {"caption": p.caption}})
    write_codes_shard(ShardStore(root), res, "00000", samples)
    return jpegs


def to_pixels(jpegs: list[bytes], device) -> torch.Tensor:
    from PIL import Image

    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float32) for b in jpegs]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return (x / 127.5 - 1.0).to(device)


def build_vq(name: str, models_root: str, device):
    from tessera.models.refs import resolve
    from tessera.models.vq import VQ_CONFIGS, VQModel, load_vq

    if name == "tiny":
        return load_vq(resolve("tiny:vq", models_root), device=device).eval()
    return VQModel(VQ_CONFIGS[name]).to(device).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="GPT-tiny")
    parser.add_argument("--vq", default="VQ-16", help="'tiny' or a VQ_CONFIGS name (random weights)")
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    from tessera.config.train import CodesDataConfig, TrainConfig
    from tessera.models.gpt import build_gpt
    from tessera.models.text_encoder import TextEncoder
    from tessera.models.refs import resolve
    from tessera.models.generation import left_pad
    from tessera.training.data import CodesLoader
    from tessera.core.store import ShardStore
    from tessera.training.step import build_optimizer, train_step

    device = torch.device(args.device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    work = tempfile.mkdtemp(prefix="bench-train-")
    models_root = os.path.join(work, "models")
    vq = build_vq(args.vq, models_root, device)
    text_encoder = TextEncoder.from_pretrained(resolve("tiny:t5", models_root))
    n = args.batch * (args.steps + args.warmup)
    print(f"Preparing {n} images at {args.res}px and their code shard ({args.vq} tokenizer) ...")
    jpegs = make_data(os.path.join(work, "data"), n, args.res, vq, text_encoder, device)
    vocab = vq.config.codebook_size
    cfg = TrainConfig(model=args.model, vocab_size=vocab, global_batch=args.batch)

    def fresh():
        torch.manual_seed(0)
        model = build_gpt(args.model, grid=args.res // 16, device=device, vocab_size=vocab,
                          caption_dim=text_encoder.dim)
        return model, build_optimizer(model, cfg, device)

    def timed(next_batch) -> float:
        model, opt = fresh()
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            train_step(model, opt, [next_batch(step)], device=device, autocast_dtype=autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.steps * args.batch * (args.res // 16) ** 2 / (time.perf_counter() - start)

    loader = CodesLoader(ShardStore(os.path.join(work, "data")), CodesDataConfig(resolution=args.res, text="stored"),
                         args.batch, caption_dim=text_encoder.dim)
    ours = timed(lambda step: loader.next_batch())
    loader.close()

    def llamagen_batch(step: int) -> dict:
        chunk = jpegs[step * args.batch:(step + 1) * args.batch]
        with torch.no_grad():
            codes = vq.encode(to_pixels([j for j, _ in chunk], device)).flatten(1)
        cond, mask = left_pad([torch.from_numpy(f.astype(np.float32)) for _, f in chunk], text_encoder.dim)
        return {"codes": codes, "cond": cond, "cond_mask": mask, "valid": mask.any(1)}

    baseline = timed(llamagen_batch)
    print(f"model {args.model}, tokenizer {args.vq}, {args.res}px, batch {args.batch}, {args.steps} steps, "
          f"{args.device}")
    print(f"  from code shards (Tessera):          {ours:10.0f} image tokens/s")
    print(f"  VQ-encoding every step (LlamaGen):   {baseline:10.0f} image tokens/s")
    print(f"  ratio: {ours / baseline:.2f}x")


if __name__ == "__main__":
    main()
