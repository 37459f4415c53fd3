"""Visual check of the code shards: decode a few samples and show them beside their originals.

    python -m tessera.demo.visual_check --config configs/demo.yaml [--count 8]

writes reports/visual_check_{res}.png per resolution: the top row holds the original images
(resized and centre-cropped as the tokenizer saw them), the row below what their stored codes
decode to. Codes that decode to something unlike the image above them mean the shards, the VQ
checkpoint or the crop went wrong.
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import sys

import numpy as np

from tessera.config import load_config
from tessera.core.store import ShardStore
from tessera.core.tars import MAX_OWN_MEMBER_BYTES, tar_members
from tessera.core.token_shards import tokens_folder
from tessera.models.refs import resolve
from tessera.models.vq import load_vq
from tessera.pipelines import intake
from tessera.pipelines.tokenize import centre_crop

log = logging.getLogger(__name__)
TILE = 256


def read_samples(store: ShardStore, res: int, count: int) -> list[tuple[str, str, np.ndarray]]:
    """The first `count` (shard, key, codes) of the finished code shards at `res`."""
    out: list[tuple[str, str, np.ndarray]] = []
    for shard in store.done_shards(tokens_folder(res)):
        url = store.url(tokens_folder(res), f"{shard}.tar")
        with store.fs.open(store.path(tokens_folder(res), f"{shard}.tar"), "rb") as f:
            for m in tar_members(f, url, MAX_OWN_MEMBER_BYTES, wanted=lambda name: name.endswith(".codes.npy")):
                if m.data is not None:
                    out.append((shard, m.name[: -len(".codes.npy")], np.load(io.BytesIO(m.data))))
                    if len(out) == count:
                        return out
    return out


def original_images(store: ShardStore, keys: list[tuple[str, str]]) -> dict[str, bytes]:
    """Image bytes of the (shard, key)s from the download shards."""
    found: dict[str, bytes] = {}
    wanted = {k for _, k in keys}
    for shard in sorted({s for s, _ in keys}):
        for key, files in intake.read_samples(store, shard, wanted).items():
            image = next((files[e] for e in ("jpg", "png", "webp") if e in files), None)
            if image is not None:
                found[key] = image
    return found


def render(store: ShardStore, vq, res: int, count: int = 8) -> bytes | None:
    """PNG bytes of the grid (originals above, decoded codes below), or None without samples."""
    import torch
    from PIL import Image

    samples = read_samples(store, res, count)
    if not samples:
        return None
    codes = torch.from_numpy(np.stack([c.astype(np.int64) for _, _, c in samples]))
    decoded = ((vq.decode(codes).permute(0, 2, 3, 1).cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    originals = original_images(store, [(s, k) for s, k, _ in samples])
    grid = Image.new("RGB", (TILE * len(samples), 2 * TILE), (128, 128, 128))
    for i, ((_, key, _), dec) in enumerate(zip(samples, decoded)):
        if key in originals:
            img = centre_crop(Image.open(io.BytesIO(originals[key])).convert("RGB"), res)
            grid.paste(img.resize((TILE, TILE), Image.BICUBIC), (i * TILE, 0))
        grid.paste(Image.fromarray(dec).resize((TILE, TILE), Image.BICUBIC), (i * TILE, TILE))
    buf = io.BytesIO()
    grid.save(buf, "PNG")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--count", type=int, default=8, help="samples per resolution")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    store = ShardStore(cfg.data_root)
    tcfg = cfg.tokenize
    path = resolve(tcfg.vq, cfg.models_root)
    vq = load_vq(path, None if os.path.isdir(path) else tcfg.vq_config, ema=tcfg.vq_ema)
    written = 0
    for res in tcfg.resolutions:
        png = render(store, vq, res, args.count)
        if png is None:
            log.info("No finished code shards at %d px under %s: run the curate flow first.", res, store.root)
            continue
        store.write_bytes(png, "reports", f"visual_check_{res}.png")
        log.info("Originals (top) and decoded codes (bottom) at %d px: %s", res, store.url("reports", f"visual_check_{res}.png"))
        written += 1
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
