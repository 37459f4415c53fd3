"""Captioning throughput: captions/s of the caption stage's model actor at batch sizes 1, 8 and 32,
and each one's ratio to batch 1, measured in the same run.

    python -m bench.caption [--model tiny:llava] [--device cpu|cuda] [--images 64] [--max-new-tokens 16]

The actor's whole per-batch work is timed: JPEG decoding, the processor, batched (left-padded)
generation, decoding and the output checks. The default is the demo's tiny LLaVA on the CPU; give
a real checkpoint (e.g. llava-hf/llava-1.5-7b-hf, a local folder) and --device cuda on a GPU node.
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time



def jpeg_batch(n: int) -> list[bytes]:
    from tessera.demo.synthetic import draw, picture

    out = []
    for i in range(n):
        buf = io.BytesIO()
        draw(picture(i, 0)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main() -> None:
    import torch

    from tessera.config.caption import CaptionConfig
    from tessera.models.refs import resolve
    from tessera.pipelines.caption import CaptionShard

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny:llava")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=64, help="images captioned per batch size")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as models_root:
        path = resolve(args.model, models_root)
        images = jpeg_batch(args.images)
        rates = {}
        for batch_size in [int(b) for b in args.batches.split(",")]:
            cfg = CaptionConfig(model=args.model, max_new_tokens=args.max_new_tokens, batch_size=batch_size,
                                precision="bf16" if args.device == "cuda" else "fp32")
            work = CaptionShard(cfg, path, args.device, {})

            def batch(start: int) -> list[dict]:
                return [{"key": f"{start + i:09d}", "image": img, "caption": "a picture"}
                        for i, img in enumerate(images[start:start + batch_size])]

            work.caption_batch(batch(0))  # warm-up
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            done = 0
            for s in range(0, args.images, batch_size):
                done += len(work.caption_batch(batch(s)))
            if args.device == "cuda":
                torch.cuda.synchronize()
            rates[batch_size] = done / (time.perf_counter() - start)
    base = rates[min(rates)]
    print(f"Captioning with {args.model} on {args.device} ({torch.get_num_threads()} threads), "
          f"{args.images} images, {args.max_new_tokens} new tokens each:")
    print(f"{'batch':>6} {'captions/s':>11} {'vs batch ' + str(min(rates)):>12}")
    for b, r in rates.items():
        print(f"{b:>6} {r:>11.2f} {r / base:>11.2f}x")


if __name__ == "__main__":
    main()
