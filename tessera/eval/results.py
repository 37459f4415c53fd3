"""What the eval stage writes for people: metrics.jsonl, TensorBoard scalars and the samples page."""
from __future__ import annotations

import html
import json
import math
import time

import pyarrow as pa

from tessera.core.store import ShardStore


def append_metrics(ev: ShardStore, row: dict) -> None:
    """One line per evaluated checkpoint in eval/metrics.jsonl; a re-evaluation replaces its line."""
    lines = []
    if ev.exists("metrics.jsonl"):
        with ev.fs.open(ev.path("metrics.jsonl"), "r") as f:
            lines = [ln for ln in f.read().splitlines() if ln and json.loads(ln).get("label") != row["label"]]
    lines.append(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **row}))
    ev.write_bytes(("\n".join(lines) + "\n").encode(), "metrics.jsonl")


def read_metrics(ev: ShardStore) -> list[dict]:
    if not ev.exists("metrics.jsonl"):
        return []
    with ev.fs.open(ev.path("metrics.jsonl"), "r") as f:
        return [json.loads(ln) for ln in f.read().splitlines() if ln]


def write_tensorboard(ev: ShardStore, row: dict) -> None:
    """Scalars eval/{metric} at the checkpoint's step, one TensorBoard run per stage, on any fsspec
    root (TensorBoard writes through fsspec for URLs it has no file system of its own for)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(ev.url("tensorboard", row["stage"])) as writer:
        for k, v in row.items():
            if k not in ("step", "resolution", "failed_shards") and isinstance(v, (int, float)) and math.isfinite(v):
                writer.add_scalar(f"eval/{k}", v, row["step"])


def _seen(r: dict) -> str:
    if "seen_color" not in r:
        return ""
    return f"shows a {r['seen_color']} {r['seen_shape']} {r['seen_place']} on a {r['seen_background']} background"


def write_page(ev: ShardStore, labels: list[str], prompts: pa.Table, limit: int) -> str:
    """eval/samples.html: per prompt (the first `limit`), each checkpoint's images side by side."""
    limit = min(limit, prompts.num_rows)
    shown = {}
    for label in labels:
        store = ShardStore(ev.url(label))
        for name in store.list("rows", ".parquet"):
            t = store.read_table("rows", name).to_pylist()
            for r in t:
                if r["row"] < limit:
                    shown.setdefault(r["row"], {}).setdefault(label, []).append(r)
            if t and t[-1]["row"] >= limit:
                break
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    body = []
    for i in sorted(shown):
        prompt = prompts["prompt"][i].as_py()
        cells = []
        for label in labels:
            imgs = "".join(
                f'<figure><img src="{html.escape(label)}/{html.escape(r["image"])}" width="128" '
                f'title="{html.escape(_seen(r))}">'
                f'<figcaption>CLIP {r["clip_score"]:.1f}'
                + (f' · {"✓" if r.get("hit_all") else "✗"}' if "hit_all" in r else "") + "</figcaption></figure>"
                for r in shown[i].get(label, []))
            cells.append(f"<td>{imgs}</td>")
        body.append(f"<tr><td>{html.escape(prompt)}</td>{''.join(cells)}</tr>")
    page = ("<!doctype html><meta charset='utf-8'><title>Samples by prompt</title>"
            "<style>body{font-family:sans-serif}td{vertical-align:top;padding:4px}"
            "figure{display:inline-block;margin:2px}figcaption{font-size:11px}</style>"
            f"<h1>Samples by prompt</h1><table><tr><th>prompt</th>{head}</tr>{''.join(body)}</table>")
    ev.write_bytes(page.encode(), "samples.html")
    return ev.url("samples.html")
