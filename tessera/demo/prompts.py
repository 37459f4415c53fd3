"""The demo's held-out prompt set: descriptions of the world that no training picture or caption
shows, each with its truth, the palette, and a rendering of it as the reference image."""
from __future__ import annotations

import io
import random

import pyarrow as pa

from tessera.core.store import ShardStore
from tessera.demo.world import COLORS, HELD_OUT, PLACES, Picture, draw
from tessera.eval.prompts import FILE, with_palette


def write_heldout_prompts(store: ShardStore, count: int, seed: int, image_size: int = 512) -> str:
    """Write `count` held-out prompts (every place of each held-out (shape, colour, background)),
    with their truth and reference images. Returns the parquet's URL; a set already written is kept."""
    if store.exists(FILE):
        return store.url(FILE)
    unseen = [Picture(shape, color, background, place, image_size, image_size)
              for shape, color, background in HELD_OUT for place in PLACES]
    if len(unseen) < count:
        raise ValueError(f"the synthetic world has only {len(unseen)} held-out descriptions; "
                         f"asked for {count} held-out prompts")
    chosen = random.Random(seed).sample(unseen, count)
    rows = []
    for i, p in enumerate(chosen):
        buf = io.BytesIO()
        draw(p).save(buf, "PNG")
        store.write_bytes(buf.getvalue(), "images", f"{i:05d}.png")
        rows.append({"prompt": p.caption, "image": store.url("images", f"{i:05d}.png"), "color": p.color,
                     "shape": p.shape, "place": p.place, "background": p.background})
    store.write_table(with_palette(pa.Table.from_pylist(rows), COLORS), FILE)
    return store.url(FILE)
