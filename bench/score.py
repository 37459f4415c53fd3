"""Scoring throughput: one shared CLIP image pass against one model pass per CLIP-based filter.

Both score the same JPEGs in the same run with the same models: decode, CLIP preprocess, CLIP
image (and caption) embedding, then the CLIP score, aesthetic and NSFW heads and the embedding
kept for near-duplicate search. The shared pass decodes and embeds each image once for all four;
the baseline runs each filter on its own, as separate filter tools would. The models are built
with random weights (throughput does not depend on them), saved in their real formats and loaded
through the real loaders.

    python -m bench.score [--model ViT-B-32] [--images 128] [--batch-size 32] [--device auto]
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import tempfile
import time

import numpy as np
import torch


def make_images(n: int) -> tuple[list[bytes], list[str]]:
    from tessera.demo.synthetic import draw, picture

    images, captions = [], []
    for i in range(n):
        p = picture(i, seed=7)
        buf = io.BytesIO()
        draw(p).save(buf, "JPEG", quality=92)
        images.append(buf.getvalue())
        captions.append(p.caption)
    return images, captions


def build_models(model: str, root: str) -> dict[str, str]:
    """Random-weight CLIP, aesthetic and NSFW heads, saved as their real file layouts."""
    import open_clip

    from tessera.models.aesthetic import AestheticHead
    from tessera.models.nsfw import NsfwHead

    logging.disable(logging.WARNING)  # "initialized randomly" is the point here
    clip = open_clip.create_model(model, pretrained=None)
    logging.disable(logging.NOTSET)
    dim = open_clip.get_model_config(model)["embed_dim"]
    paths = {"clip": os.path.join(root, "clip.bin"), "aesthetic": os.path.join(root, "aesthetic.pth"),
             "nsfw": os.path.join(root, "nsfw.pth")}
    torch.save(clip.state_dict(), paths["clip"])
    torch.save(AestheticHead(dim).state_dict(), paths["aesthetic"])
    torch.save(NsfwHead(dim).state_dict(), paths["nsfw"])
    return paths


def batches(images, captions, size):
    for start in range(0, len(images), size):
        stop = min(start + size, len(images))
        keys = np.array([f"{i:09d}" for i in range(start, stop)], dtype=object)
        yield {"shard": np.array(["00000"] * (stop - start), dtype=object), "key": keys,
               "image": np.array(images[start:stop], dtype=object),
               "caption": np.array(captions[start:stop], dtype=object),
               "meta": np.array(["{}"] * (stop - start), dtype=object)}


def shared_pass(scorer, images, captions, size) -> dict[str, np.ndarray]:
    from tessera.pipelines.score import decode_batch, meta_frame

    out: dict[str, list] = {}
    for batch in batches(images, captions, size):
        decoded = decode_batch(batch, scorer.clip.preprocess, None)
        meta = meta_frame(decoded["key"], decoded["caption"], decoded["meta"])
        scores = scorer.score(meta, decoded["clip_pixels"], None, decoded["error"] == "")
        for k in ("clip_score", "aesthetic", "punsafe", "embedding"):
            out.setdefault(k, []).append(scores[k])
    return {k: np.concatenate(v) for k, v in out.items()}


def separate_passes(scorer, images, captions, size) -> dict[str, np.ndarray]:
    """Each CLIP-based filter decodes and embeds every image itself."""
    from tessera.filters import Batch
    from tessera.pipelines.score import decode_batch, meta_frame

    filters = {f.name: f for f in scorer.filters}
    out: dict[str, list] = {}
    for name in ("clip_score", "aesthetic", "nsfw", "near_duplicate"):
        for batch in batches(images, captions, size):
            decoded = decode_batch(batch, scorer.clip.preprocess, None)
            meta = meta_frame(decoded["key"], decoded["caption"], decoded["meta"])
            b = Batch(meta=meta, image_embedding=scorer.clip.encode_images(decoded["clip_pixels"]))
            if name == "clip_score":
                b.text_embedding = scorer.clip.encode_texts(meta["caption"].tolist())
            if name == "near_duplicate":
                out.setdefault("embedding", []).append(b.image_embedding)
            else:
                for k, v in filters[name].score(b).items():
                    out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (default ViT-B-32)")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    from tessera.config.filters import FiltersConfig
    from tessera.pipelines.score import BatchScorer

    images, captions = make_images(args.images)
    with tempfile.TemporaryDirectory() as root:
        paths = build_models(args.model, root)
        cfg = FiltersConfig.model_validate({
            "precision": "bf16" if device == "cuda" else "fp32",
            "clip": {"model": args.model, "checkpoint": paths["clip"], "force_quick_gelu": False},
            "aesthetic": {"weights": paths["aesthetic"]}, "nsfw": {"weights": paths["nsfw"]},
            "watermark": {"source": "off"}, "dedup": {"enabled": True},
        })
        sources = {n: {"source": "compute", "column": None} for n in ("clip_score", "aesthetic", "nsfw")}
        scorer = BatchScorer(cfg, sources, paths, device)
    print(f"{args.images} images, {args.model}, batch {args.batch_size}, device {device}, "
          f"torch threads {torch.get_num_threads()}")
    shared_pass(scorer, images[: args.batch_size], captions[: args.batch_size], args.batch_size)  # warm-up
    results = {}
    for name, fn in (("shared pass", shared_pass), ("separate passes", separate_passes)):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        results[name] = fn(scorer, images, captions, args.batch_size)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        results[name]["_rate"] = args.images / seconds
        print(f"  {name:16s} {args.images / seconds:8.1f} images/s  ({seconds:.2f} s)")
    a, b = results["shared pass"], results["separate passes"]
    tol = 5e-2 if device == "cuda" else 1e-4
    same = all(np.allclose(a[k], b[k], atol=tol, equal_nan=True) for k in ("clip_score", "aesthetic", "punsafe"))
    print(f"  same scores both ways: {same}")
    print(f"shared pass / separate passes: {a['_rate'] / b['_rate']:.2f}x")


if __name__ == "__main__":
    main()
