"""reports/report.html: one self-contained page that says why each image was kept or dropped.

The funnel of every stage so far, where each score came from, the thresholds, a histogram per
score (kept and dropped stacked, the threshold marked), and grids of example images kept and
dropped nearest to each threshold. Images are inline (base64 JPEG thumbnails); no scripts, no
external files, so it opens anywhere, including from an object store.

No score rows are loaded in the driver: the histograms are select's fixed-bin counts
(reports/histograms.json), and each shard's Ray task offers its few samples nearest each
threshold, of which the nearest are kept as they arrive.
"""
from __future__ import annotations

import base64
import html
import io
import logging
import time

import numpy as np
import pandas as pd

from tessera.core.runtime import map_shards
from tessera.core.store import ShardStore
from tessera.filters import SCORE_FILTERS
from tessera.pipelines import score, select_work
from tessera.pipelines.select_work import HISTOGRAMS, histogram_marks

log = logging.getLogger(__name__)
REPORT = ("reports", "report.html")
THUMB = 128
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#1d2430;padding:0 16px}
h1{font-size:24px;margin-bottom:4px} h2{font-size:19px;margin-top:34px;border-bottom:1px solid #dde2ea;padding-bottom:4px}
h3{font-size:15px;margin:18px 0 6px} .muted{color:#667085} table{border-collapse:collapse;font-size:13px}
td,th{padding:4px 10px;border-bottom:1px solid #eef1f5;text-align:left} th{background:#f5f7fa}
td.num{text-align:right;font-variant-numeric:tabular-nums} .bar{background:#4c78a8;height:10px;display:inline-block}
.bar.drop{background:#e45756} .hists{display:flex;flex-wrap:wrap;gap:18px} .hist{border:1px solid #eef1f5;padding:8px}
.grid{display:flex;flex-wrap:wrap;gap:8px} .card{width:128px;font-size:11px;line-height:1.25}
.card img{width:128px;height:128px;object-fit:cover;display:block;border:3px solid #4c78a8}
.card.dropped img{border-color:#e45756} .pair{display:flex;gap:24px;flex-wrap:wrap}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}
"""


def _e(x) -> str:
    return html.escape(str(x))


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    return f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)


def funnel_table(rows: list[dict]) -> str:
    top = max((r["count"] for r in rows), default=1) or 1
    body = "".join(
        f"<tr><td>{_e(r['stage'])}</td><td>{_e(r['outcome'])}</td><td>{_e(r['reason'])}</td>"
        f"<td class=num>{r['count']:,}</td><td><span class='bar{'' if r['outcome'] != 'dropped' else ' drop'}' "
        f"style='width:{max(1, int(300 * r['count'] / top))}px'></span></td></tr>"
        for r in rows)
    return f"<table><tr><th>stage</th><th>outcome</th><th>reason</th><th>count</th><th></th></tr>{body}</table>"


def histogram_svg(edges: list[float], n_keep: list[int], n_drop: list[int], title: str,
                  marks: list[tuple[float, str]], width: int = 360, height: int = 190) -> str:
    """Kept (blue) and dropped (red) stacked per bin, each threshold a dashed line with its value."""
    pad_l, pad_b, pad_t = 36, 28, 22
    plot_w, plot_h = width - pad_l - 8, height - pad_b - pad_t
    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img' "
           f"aria-label='{_e(title)}'><text x='{pad_l}' y='14' font-size='12' font-weight='600'>{_e(title)}</text>"]
    n_keep, n_drop = np.asarray(n_keep), np.asarray(n_drop)
    if not len(edges) or not (n_keep.sum() + n_drop.sum()):
        out.append(f"<text x='{pad_l}' y='{pad_t + 40}' font-size='12' fill='#667085'>no valid values</text></svg>")
        return "".join(out)
    lo, hi = float(edges[0]), float(edges[-1])
    bins = len(edges) - 1
    top = max(1, int((n_keep + n_drop).max()))
    bw = plot_w / bins
    x = lambda val: pad_l + (val - lo) / (hi - lo) * plot_w  # noqa: E731
    for i in range(bins):
        hk, hd = plot_h * n_keep[i] / top, plot_h * n_drop[i] / top
        base = pad_t + plot_h
        if hk:
            out.append(f"<rect x='{pad_l + i * bw:.1f}' y='{base - hk:.1f}' width='{bw - 1:.1f}' height='{hk:.1f}' fill='#4c78a8'/>")
        if hd:
            out.append(f"<rect x='{pad_l + i * bw:.1f}' y='{base - hk - hd:.1f}' width='{bw - 1:.1f}' "
                       f"height='{hd:.1f}' fill='#e45756'/>")
    base = pad_t + plot_h
    out.append(f"<line x1='{pad_l}' y1='{base}' x2='{pad_l + plot_w}' y2='{base}' stroke='#98a2b3'/>")
    out.append(f"<text x='{pad_l}' y='{base + 14}' font-size='10'>{_fmt(lo)}</text>"
               f"<text x='{pad_l + plot_w}' y='{base + 14}' font-size='10' text-anchor='end'>{_fmt(hi)}</text>"
               f"<text x='{pad_l - 4}' y='{pad_t + 8}' font-size='10' text-anchor='end'>{top}</text>")
    for i, (t, label) in enumerate(marks):
        anchor = "end" if x(t) > pad_l + plot_w / 2 else "start"
        nudge = -3 if anchor == "end" else 3
        out.append(f"<line x1='{x(t):.1f}' y1='{pad_t}' x2='{x(t):.1f}' y2='{base}' stroke='#111' "
                   f"stroke-width='1.5' stroke-dasharray='4 3'/>"
                   f"<text x='{x(t) + nudge:.1f}' y='{pad_t + 10 + 12 * i}' font-size='10' text-anchor='{anchor}' "
                   f"fill='#111'>{_e(label)} {_fmt(t)}</text>")
    out.append("</svg>")
    return "".join(out)


def previews(store: ShardStore, wanted: pd.DataFrame) -> dict[str, tuple[str | None, str]]:
    """key -> (data: URI of a small JPEG or None, caption), for the samples in `wanted` (columns
    shard, key), read from their download shards. A shard that cannot be read shows no images."""
    out: dict[str, tuple[str | None, str]] = {}
    for shard, keys in wanted.groupby("shard")["key"]:
        keys = set(keys)
        try:
            samples = score.read_shard(store, shard)
        except RuntimeError as e:
            log.warning("Report: no example images from shard %s: %s", shard, e)
            continue
        for sample in samples:
            if sample["key"] in keys:
                out[sample["key"]] = (thumbnail(sample["image"]), sample["caption"])
    return out


def thumbnail(data: bytes | None) -> str | None:
    """A small JPEG as a data: URI, or None for a missing or broken image."""
    from PIL import Image

    if data is None:
        return None
    try:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        img.thumbnail((THUMB * 2, THUMB * 2))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
    except Exception:  # noqa: BLE001 - a broken image just has no thumbnail
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def card(row, shown: dict[str, tuple[str | None, str]], column: str | None) -> str:
    src, caption = shown.get(row["key"], (None, ""))
    img = f"<img src='{src}' alt='{_e(row['key'])}'>" if src else "<div style='width:128px;height:128px;background:#eee'></div>"
    value = f"{column} {_fmt(row[column])}<br>" if column else ""
    reason = f"<b>{_e(row['reason'])}</b>" if row["reason"] else "kept"
    extra = f"<br>dup of {_e(row['duplicate_of'])}" if row.get("duplicate_of") else ""
    caption = _e(caption[:60])
    return (f"<div class='card{'' if row['keep'] else ' dropped'}'>{img}{value}{reason}{extra}<br>"
            f"<span class=muted>{_e(row['key'])}</span><br>{caption}</div>")


def near_threshold(frame: pd.DataFrame, column: str, threshold: float, higher: bool, reason: str,
                   n: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The n samples passing this threshold closest to it, and the n dropped by it closest to it.
    reason None: the samples kept and those dropped below the target."""
    values = frame[column].to_numpy(dtype=np.float64)
    distance = np.abs(values - threshold)
    if reason is None:
        above, below = frame["keep"].to_numpy(), (frame["reason"] == "below_target").to_numpy()
    else:
        passing = values >= threshold if higher else values <= threshold
        above, below = passing & (frame["error"] == "").to_numpy(), (frame["reason"] == reason).to_numpy()
    return tuple(nearest(frame, side, distance, n) for side in (above, below))


def nearest(frame: pd.DataFrame, rows: np.ndarray, distance: np.ndarray, n: int) -> pd.DataFrame:
    """The n of these rows nearest (by distance, then key), sorting only the candidates within
    the n-th smallest distance: a shard's report work stays small whatever its size."""
    d = distance[rows]
    if len(d) > n:
        cut = np.partition(d, n - 1)[n - 1]
        if np.isfinite(cut):
            rows = rows & (distance <= cut)
    return frame[rows].assign(_d=distance[rows]).sort_values(["_d", "key"]).head(n)


def decisions_frame(store: ShardStore, shard: str, columns: list[str]) -> pd.DataFrame:
    """One shard's key, error, decisions and these score columns (a projected read, not a full one)."""
    frame = select_work.read_frame(store, shard, decisions=True, columns=columns)
    for col, default in (("keep", False), ("reason", ""), ("duplicate_of", "")):
        if col not in frame:
            frame[col] = default
    frame["keep"] = frame["keep"].fillna(False).astype(bool)
    frame["reason"] = frame["reason"].fillna("")
    frame["duplicate_of"] = frame["duplicate_of"].fillna("")
    frame.insert(0, "shard", shard)
    return frame


def candidates(store: ShardStore, shard: str, grids: list[dict], n: int) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
    """One shard's nearest n samples on each side of each grid's threshold, and its first n
    near-duplicates by key: at most 2n rows per grid, whatever the shard's size."""
    frame = decisions_frame(store, shard, [g["column"] for g in grids if g["column"]])
    out = []
    for g in grids:
        if g["column"] is None:
            dups = frame[frame["reason"] == "near_duplicate"].sort_values("key").head(n)
            out.append((frame.head(0), dups))
        elif g["column"] in frame:
            out.append(near_threshold(frame, g["column"], g["threshold"], g["higher"], g["reason"], n))
        else:
            out.append((frame.head(0), frame.head(0)))
    return out


def with_keys(store: ShardStore, shard: str, keys: set[str]) -> pd.DataFrame:
    """The near-duplicate originals among one shard's rows (their cards show no score)."""
    frame = decisions_frame(store, shard, [])
    return frame[frame["key"].isin(keys)]


def build(store: ShardStore, funnel: list[dict], examples: int = 6, sections: list[str] = ()) -> str:
    """Write reports/report.html from the selection's summaries (thresholds.json, histograms.json)
    and the examples each shard offers near each threshold, with any extra HTML `sections` after the
    funnel (the demo adds its truth); returns its URL."""
    shards = store.done_shards(select_work.STAGE)
    summary = store.read_json("reports", "thresholds.json")
    histograms = store.read_json("reports", "histograms.json") if store.exists("reports", "histograms.json") else {}
    score_infos = store.markers(score.STAGE)  # one batched read, not one request per shard
    parts = [header_html(summary, len(shards)), funnel_html(summary, funnel), *sections,
             sources_html(summary, score_infos), thresholds_html(summary), histograms_html(summary, histograms),
             examples_html(store, shards, summary, examples), "</body></html>"]
    store.write_bytes("".join(parts).encode(), *REPORT)
    url = store.url(*REPORT)
    log.info("Filter report written to %s.", url)
    return url


def header_html(summary: dict, shards: int) -> str:
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>Tessera filter report</title>"
            f"<style>{STYLE}</style></head><body><h1>Filter report</h1>"
            f"<p class=muted>{summary['samples']:,} scored samples in {shards} shards; "
            f"<b>{summary['kept']:,} kept</b>, {summary['samples'] - summary['kept']:,} dropped. "
            f"Written {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}.</p>")


def funnel_html(summary: dict, funnel: list[dict]) -> str:
    return ("<h2>Funnel</h2><p class=muted>Every input row ends kept or dropped with one reason; "
            "a sample failing several filters is dropped for the first in this order: "
            f"{_e(', '.join(summary['order']))}.</p>" + funnel_table(funnel))


def sources_html(summary: dict, score_infos: dict[str, dict]) -> str:
    """Where each score came from, with the number of shards for each source."""
    rows = []
    for name, info in sorted(summary["sources"].items()):
        column = SCORE_FILTERS[name].column
        per_shard = {}
        for s_info in score_infos.values():
            src = s_info["sources"].get(name, {})
            label = {"compute": "computed by the model", "metadata": f"input column {src.get('column')!r}",
                     "missing": f"input column {src.get('column')!r} missing: dropped as {column}_missing"
                     }.get(src.get("source"), "off")
            if src.get("fallback_from"):
                label += f" (input had no {src['fallback_from']!r} column)"
            per_shard[label] = per_shard.get(label, 0) + 1
        rows.append(f"<tr><td>{_e(column)}</td><td>{'<br>'.join(f'{_e(k)} ({v} shards)' for k, v in per_shard.items())}</td></tr>")
    return "<h2>Score sources</h2><table><tr><th>score</th><th>source</th></tr>" + "".join(rows) + "</table>"


def thresholds_html(summary: dict) -> str:
    rows = []
    for name, desc in summary["filters"].items():
        rule = ", ".join(f"{k} {_fmt(v)}" for k, v in desc.items() if k not in ("source",)) or "-"
        rows.append(f"<tr><td>{_e(name)}</td><td>{_e(rule)}</td></tr>")
    if summary.get("target"):
        t = summary["target"]
        rows.append(f"<tr><td>target</td><td>keep {t['requested']:,} ranked by {_e(t['rank_by'])}: kept {t['kept']:,}, "
                    f"lowest kept {_e(t['rank_by'])} {_fmt(t['threshold'])}"
                    f"{', short by ' + str(t['shortfall']) if t.get('shortfall') else ''}</td></tr>")
    return "<h2>Thresholds</h2><table><tr><th>filter</th><th>rule</th></tr>" + "".join(rows) + "</table>"


def histograms_html(summary: dict, histograms: dict) -> str:
    """Histograms with their thresholds, from the selection's fixed bins."""
    marks = histogram_marks(summary)
    hists = [histogram_svg(h["edges"], h["kept"], h["dropped"], title, marks.get(col, []))
             for col, title in HISTOGRAMS.items() if (h := histograms.get(col))]
    return ("<h2>Score distributions</h2><p class=legend><span style='background:#4c78a8'></span>kept"
            "<span style='background:#e45756'></span>dropped (any reason); dashed: thresholds</p>"
            "<div class=hists>" + "".join(f"<div class=hist>{h}</div>" for h in hists) + "</div>")


def example_grids(summary: dict) -> list[dict]:
    """One grid per threshold (and the target, and near-duplicates): what its examples are sorted by."""
    grids = []
    for name, desc in summary["filters"].items():
        if desc.get("threshold") is not None and desc.get("score"):
            f = SCORE_FILTERS[name]
            grids.append({"title": f"{f.column} {desc['keep_if']} {_fmt(desc['threshold'])}", "column": f.column,
                          "threshold": desc["threshold"], "higher": f.higher_is_better, "reason": f.fail_reason})
    target = summary.get("target") or {}
    if target.get("threshold") is not None and not np.isnan(target["threshold"]):
        col = target["rank_by"]
        grids.append({"title": f"target: {col} {target['keep_if']} {_fmt(target['threshold'])}", "column": col,
                      "threshold": target["threshold"], "higher": target["keep_if"] == ">=", "reason": None})
    if summary["dropped"].get("near_duplicate"):
        grids.append({"title": "near-duplicates", "column": None})
    return grids


def nearest_examples(store: ShardStore, shards: list[str], grids: list[dict], examples: int) -> list[tuple]:
    """Per grid, the examples nearest its threshold on each side (Ray passes over the shards): each
    shard offers its nearest few, the nearest of those win. For near-duplicates: the copies dropped
    and the originals they copy."""
    best = [[None, None] for _ in grids]

    def nearest(_shard: str, offered: list) -> None:  # keep only the best `examples` per side so far
        for i, g in enumerate(grids):
            for side in (0, 1):
                both = pd.concat([f for f in (best[i][side], offered[i][side]) if f is not None])
                by = ["key"] if g["column"] is None else ["_d", "key"]
                best[i][side] = both.sort_values(by).head(examples)

    if grids and shards:
        map_shards("report", store, shards, candidates, kwargs={"grids": grids, "n": examples}, fold=nearest)
    chosen = []
    for g, (above, below) in zip(grids, best):
        if g["column"] is None:
            found = [below.head(0)]
            map_shards("report-originals", store, shards, with_keys, kwargs={"keys": set(below["duplicate_of"])},
                       fold=lambda _shard, rows: found.append(rows) if len(rows) else None)
            above = pd.concat(found).sort_values("key")
        chosen.append((g, above, below))
    return chosen


def examples_html(store: ShardStore, shards: list[str], summary: dict, examples: int) -> str:
    chosen = nearest_examples(store, shards, example_grids(summary), examples)
    wanted = pd.concat([f for _, a, b in chosen for f in (a, b)] or [pd.DataFrame(columns=["shard", "key"])])
    shown = previews(store, wanted[["shard", "key"]].drop_duplicates()) if len(wanted) else {}
    parts = ["<h2>Examples near each threshold</h2>"]
    if not chosen:
        parts.append("<p class=muted>No score thresholds are set.</p>")
    sides = ("pass it, nearest first (their final outcome below each)", "dropped by it, nearest first")
    for g, above, below in chosen:
        column = g["column"]
        left, right = ("the originals kept in their group", "the copies dropped") if column is None else sides
        parts.append(f"<h3>{_e(g['title'])}</h3><div class=pair>"
                     f"<div><p class=muted>{left} ({len(above)})</p><div class=grid>"
                     + "".join(card(r, shown, column) for _, r in above.iterrows()) + "</div></div>"
                     f"<div><p class=muted>{right} ({len(below)})</p><div class=grid>"
                     + "".join(card(r, shown, column) for _, r in below.iterrows()) + "</div></div></div>")
    return "".join(parts)
