"""Stage outputs written directly in their on-disk formats, so each stage can be tested alone.

`write_download_shard` writes what the download stage leaves (img2dataset's tar and parquet
plus our marker); `write_selection` writes what score and select leave (scores, and select's
decisions with keep and reason).
"""
from __future__ import annotations

import io
import json

import pyarrow as pa
import webdataset as wds

from tessera.core.lineage import selection_summary, write_decisions
from tessera.core.store import ShardStore
from tessera.demo.synthetic import Picture, draw, picture


def sample_key(shard: str, i: int) -> str:
    return f"{shard}{i:04d}"


def write_download_shard(store: ShardStore, shard: str, n: int = 8, seed: int = 0,
                         pictures: list[Picture] | None = None) -> list[dict]:
    """A finished download shard of `n` synthetic images; returns its parquet rows."""
    pictures = pictures or [picture(int(shard) * 1000 + i, seed) for i in range(n)]
    rows = []
    buf = io.BytesIO()
    with wds.TarWriter(buf) as tar:
        for i, p in enumerate(pictures):
            key = sample_key(shard, i)
            img = draw(p)
            jpg = io.BytesIO()
            img.save(jpg, "JPEG", quality=92)
            meta = {
                "url": f"http://127.0.0.1:1/img/{key}.jpg", "caption": p.caption, "row_index": int(shard) * 1000 + i,
                "top_caption": p.caption, "similarity": 0.3, "hash": 1000 + i, "pwatermark": 0.1,
                "punsafe": 0.01, "WIDTH": float(p.width), "HEIGHT": float(p.height),
                "key": key, "status": "success", "error_message": None,
                "width": p.width, "height": p.height, "original_width": p.width,
                "original_height": p.height, "sha256": f"{i:064x}",
            }
            tar.write({"__key__": key, "jpg": jpg.getvalue(), "txt": p.caption, "json": json.dumps(meta)})
            rows.append(meta)
    store.write_bytes(buf.getvalue(), "download", f"{shard}.tar")
    store.write_table(pa.Table.from_pylist(rows), "download", f"{shard}.parquet")
    store.mark_done("download", shard, {"rows_in": len(rows), "downloaded": len(rows), "dropped": {},
                                        "columns": sorted(rows[0]) if rows else []})
    return rows


def write_selection(store: ShardStore, shard: str, rows: list[dict], keep: list[bool]) -> None:
    """What score and select leave: scores/{shard}.parquet, select/{shard}.parquet with keep and
    reason, and select's marker."""
    table = pa.Table.from_pylist([
        {"key": r["key"], "url": r["url"], "hash": r["hash"], "sha256": r["sha256"],
         "original_width": r["original_width"], "original_height": r["original_height"]}
        for r in rows
    ])
    store.write_table(table, "scores", f"{shard}.parquet")
    reasons = ["" if k else "test_drop" for k in keep]
    write_decisions(store, shard, [r["key"] for r in rows], keep, reasons, [""] * len(keep))
    store.mark_done("select", shard, selection_summary([r["key"] for r in rows], keep, reasons, [""] * len(keep)))
    thresholds = store.read_json("reports", "thresholds.json") if store.exists("reports", "thresholds.json") else {}
    shards = sorted({*thresholds.get("shards", []), shard})
    store.write_json({"fingerprint": f"test-selection-{'-'.join(shards)}", "shards": shards},
                     "reports", "thresholds.json")
