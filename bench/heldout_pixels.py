"""A pixel check of prompt-following on the demo's held-out prompts (a quick stand-in for the
evaluation stage): sample every held-out prompt from a checkpoint and read, from the decoded
pixels, the background colour (the four corners, by majority) and the shape colour (a window at
the centre of the place the prompt names), each as the nearest of the world's colours.

    python -m bench.heldout_pixels --checkpoint RUN/stage2/checkpoints/0000012.pt [--images 4]
"""
from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch


def nearest_color(rgb: np.ndarray) -> str:
    from tessera.pipelines.world import COLORS

    names = list(COLORS)
    table = np.array([COLORS[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((table - rgb) ** 2).sum(1)))]


def read_picture(img: np.ndarray, place: str) -> tuple[str, str]:
    """(background colour, shape colour) of an (S, S, 3) uint8 image drawn as the world draws."""
    s = img.shape[0]
    c = max(2, s // 8)
    corners = [img[:c, :c], img[:c, -c:], img[-c:, :c], img[-c:, -c:]]
    background = Counter(nearest_color(p.reshape(-1, 3).mean(0)) for p in corners).most_common(1)[0][0]
    cx, cy = {"in the center": (s // 2, s // 2), "on the left": (s // 4, s // 2), "on the right": (3 * s // 4, s // 2),
              "at the top": (s // 2, s // 4), "at the bottom": (s // 2, 3 * s // 4)}[place]
    w = max(1, s // 16)
    shape = nearest_color(img[cy - w:cy + w, cx - w:cx + w].reshape(-1, 3).mean(0))
    return background, shape


def main() -> None:
    from tessera.config import load_config
    from tessera.config.train import SampleConfig
    from tessera.models.gpt import gpt_config
    from tessera.models.text_encoder import TextEncoder
    from tessera.models.tiny import resolve
    from tessera.models.vq import load_vq
    from tessera.pipelines.sample import load_generator, render
    from tessera.pipelines.world import held_out_prompts

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", type=int, default=4, help="images per prompt")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.overrides)
    scfg = cfg.sample or SampleConfig()
    model, _ = load_generator(args.checkpoint, gpt_config(scfg.model, text_rope=scfg.text_rope), scfg.resolution, "cpu")
    text_encoder = TextEncoder.from_pretrained(resolve(scfg.text_encoder, cfg.models_root),
                                               max_length=model.cfg.cls_token_num, device="cpu")
    vq = load_vq(resolve(scfg.vq, cfg.models_root))
    rows = [r for r in held_out_prompts() for _ in range(args.images)]
    images, _ = render(model, vq, text_encoder, [r["prompt"] for r in rows], batch_size=8,
                       generator=torch.Generator().manual_seed(0), cfg_scale=scfg.cfg_scale,
                       temperature=scfg.temperature, top_k=scfg.top_k, top_p=scfg.top_p)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    right_bg = right_shape = 0
    for r, img in zip(rows, pixels):
        bg, shape = read_picture(img, r["place"])
        right_bg += bg == r["background"]
        right_shape += shape == r["color"]
    n = len(rows)
    print(f"held-out prompts: {len(held_out_prompts())} x {args.images} images; right background "
          f"{right_bg}/{n} ({100 * right_bg / n:.0f}%), right shape colour {right_shape}/{n} ({100 * right_shape / n:.0f}%)")


if __name__ == "__main__":
    main()
