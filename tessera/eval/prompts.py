"""Prompt sets: parquet files with a `prompt` column and, optionally, `image` (a reference image
path or URL) and the synthetic world's truth columns (color, shape, place, background).

A COCO-30k-style or PartiPrompts-style set is one such parquet that the user supplies. The demo's
held-out set is written here from the synthetic world's vocabulary: descriptions that none of the
source's training pictures has, each with its truth and a rendering of it as the reference image.
"""
from __future__ import annotations

import io
import random

import pyarrow as pa

from tessera.core.store import ShardStore

TRUTH = ("color", "shape", "place", "background")
FILE = "prompts.parquet"


def read_prompt_set(store: ShardStore, name: str = FILE) -> pa.Table:
    """The prompt set, checked: a non-empty `prompt` column of strings."""
    if not store.exists(name):
        raise FileNotFoundError(f"prompt set {store.url(name)} does not exist")
    table = store.read_table(name)
    if "prompt" not in table.column_names:
        raise ValueError(f"prompt set {store.url(name)} has no `prompt` column (columns: {table.column_names})")
    kind = table.schema.field("prompt").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"prompt set {store.url(name)}: `prompt` must be strings, not {kind}")
    if table.num_rows == 0:
        raise ValueError(f"prompt set {store.url(name)} is empty")
    return table


def has_truth(table: pa.Table) -> bool:
    return all(c in table.column_names for c in TRUTH)


def write_synthetic_prompts(store: ShardStore, count: int, seed: int, image_size: int = 512) -> str:
    """Write `count` held-out prompts of the synthetic world, with their truth and reference images.

    Held out: the world's (shape, colour, background) combinations that no training picture or
    caption shows, at every place. Returns the parquet's URL; a set already written is kept.
    """
    from tessera.demo.world import HELD_OUT, PLACES, Picture, draw

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
    store.write_table(pa.Table.from_pylist(rows), FILE)
    return store.url(FILE)
