"""Prompt sets: parquet files with a `prompt` column and, optionally, `image` (a reference image
path or URL) and truth columns (color, shape, place, background) with the palette that names the
colours in the schema's metadata, for prompt-following.

A COCO-30k-style or PartiPrompts-style set is one such parquet that the user supplies; the demo
writes its held-out set in the same format (tessera/demo/prompts.py).
"""
from __future__ import annotations

import json

import pyarrow as pa

from tessera.core.store import ShardStore

TRUTH = ("color", "shape", "place", "background")
FILE = "prompts.parquet"
PALETTE_KEY = b"tessera.palette"  # schema metadata: {colour name: [r, g, b]}


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


def with_palette(table: pa.Table, palette: dict[str, tuple[int, int, int]]) -> pa.Table:
    """The table with the palette its truth columns name stored in its schema metadata."""
    meta = dict(table.schema.metadata or {})
    meta[PALETTE_KEY] = json.dumps({name: list(rgb) for name, rgb in palette.items()}).encode()
    return table.replace_schema_metadata(meta)


def palette_of(table: pa.Table) -> dict[str, tuple[int, int, int]]:
    """The palette of a prompt set with truth columns; a clear error when it has none."""
    meta = table.schema.metadata or {}
    if PALETTE_KEY not in meta:
        raise ValueError(f"the prompt set has truth columns {TRUTH} but no palette in its schema metadata "
                         f"({PALETTE_KEY.decode()}: {{colour: [r, g, b]}})")
    return {name: tuple(rgb) for name, rgb in json.loads(meta[PALETTE_KEY]).items()}
