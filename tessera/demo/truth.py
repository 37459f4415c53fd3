"""Every stage measured against the synthetic world's truth (the demo's self-check).

The synthetic source writes a truth file beside itself (what each source row really shows, and
which defect was planted in it); no stage reads it. This module joins it with the stages'
outputs, by URL, and counts:

  filters    per filter, the planted defects of its kind that its score flags (caught), and the
             clean samples it flags; a sample counts for every filter whose threshold it fails,
             whichever filter dropped it first. A planted near-duplicate is caught when the copy
             and its original end in one near-duplicate group; a clean sample is flagged by the
             near-duplicate filter when it is dropped as a near-duplicate of any other.
  captioner  for kept samples, whether the generated caption names the true shape colour, shape,
             background and place, and how often the stage fell back to the original caption.
  tokenizer  the VQ's reconstruction error (mean absolute error in 0-255 levels, PSNR) on a few
             kept samples per resolution.

Results go to reports/truth.json (merged, section by section) and as tables to the flow.
"""
from __future__ import annotations

import io
import logging
import re

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tessera.core.lineage import read_decisions, with_decisions
from tessera.core.store import ShardStore
from tessera.demo.world import (
    COLORS,
    LOW_AESTHETIC,
    MISMATCHED_CAPTION,
    NEAR_DUPLICATE,
    NSFW,
    PLACES,
    SHAPES,
    WATERMARK,
)
from tessera.models.vq import load_vq
from tessera.pipelines.intake import read_samples
from tessera.pipelines.tokenize import centre_crop

log = logging.getLogger(__name__)
REPORT = ("reports", "truth.json")
CLEAN = "clean"
# The filter that should catch each planted defect, and its drop reason.
CATCHER = {MISMATCHED_CAPTION: "clip_score", WATERMARK: "watermark", LOW_AESTHETIC: "aesthetic",
           NSFW: "nsfw", NEAR_DUPLICATE: "near_duplicate"}
# The filters whose clean-sample drops the demo bounds together.
QUALITY_FILTERS = ("clip_score", "aesthetic", "watermark")


def read_truth(path: str) -> pd.DataFrame:
    """The truth file, one row per URL (a URL listed twice is the same picture)."""
    truth = pq.read_table(path).to_pandas()
    return truth.drop_duplicates("url", keep="first").set_index("url")


# Filters ---------------------------------------------------------------------------------------
def flags(scores: pd.DataFrame, thresholds: dict) -> dict[str, np.ndarray]:
    """Per filter, which samples its threshold fails (a missing score fails)."""
    out = {}
    for name, desc in thresholds.get("filters", {}).items():
        if "score" not in desc:
            continue
        values = scores[desc["score"]].to_numpy(dtype=np.float64) if desc["score"] in scores else np.full(len(scores), np.nan)
        t = desc.get("threshold")
        if t is None:
            passes = ~np.isnan(values)
        else:
            passes = values >= t if desc["keep_if"] == ">=" else values <= t
        out[name] = ~passes
    reasons = scores["reason"].fillna("").to_numpy(dtype=object)
    out["near_duplicate"] = reasons == "near_duplicate"
    return out


def filter_metrics(scores: pd.DataFrame, truth: pd.DataFrame, thresholds: dict) -> dict:
    """Caught planted defects and flagged clean samples, per filter, over the scored samples."""
    frame = scores.join(truth[["kind", "detail", "duplicate_of"]], on="url", rsuffix="_truth")
    frame = frame[frame["kind"].notna()].reset_index(drop=True)
    kind = frame["kind"].to_numpy(dtype=object)
    flagged = flags(frame, thresholds)
    # A planted copy is caught when it and its original end in one near-duplicate group (one of
    # them, or both, dropped as a near-duplicate of the group's kept sample).
    if "duplicate_of_truth" in frame:
        key_of = dict(zip(frame["url"], frame["key"]))
        dropped_for = dict(zip(frame["key"], frame["duplicate_of"].fillna("")))
        reason_of = dict(zip(frame["key"], frame["reason"].fillna("")))

        def group(key: str) -> str:
            return dropped_for.get(key) or key

        caught_dup = np.zeros(len(frame), bool)
        for i in np.flatnonzero(kind == NEAR_DUPLICATE):
            original, copy = key_of.get(frame["duplicate_of_truth"].iloc[i]), frame["key"].iloc[i]
            caught_dup[i] = (original is not None and group(copy) == group(original) and
                             "near_duplicate" in (reason_of.get(copy), reason_of.get(original)))
        flagged["near_duplicate"] = np.where(kind == NEAR_DUPLICATE, caught_dup, flagged["near_duplicate"])
    clean = kind == CLEAN
    per_filter = []
    for defect, name in CATCHER.items():
        if name not in flagged:
            continue
        planted = kind == defect
        per_filter.append({
            "filter": name, "defect": defect, "planted": int(planted.sum()),
            "caught": int((flagged[name] & planted).sum()), "caught_rate": _rate(flagged[name] & planted, planted),
            "clean": int(clean.sum()), "clean_flagged": int((flagged[name] & clean).sum()),
            "clean_flagged_rate": _rate(flagged[name] & clean, clean),
        })
    by_detail = []
    for (defect, detail), part in frame.groupby(["kind", "detail"]):
        if defect in CATCHER and CATCHER[defect] in flagged:
            idx = part.index.to_numpy()
            by_detail.append({"defect": defect, "detail": detail, "planted": len(idx),
                              "caught": int(flagged[CATCHER[defect]][idx].sum())})
    quality = np.zeros(len(frame), bool)
    for name in QUALITY_FILTERS:
        quality |= flagged.get(name, np.zeros(len(frame), bool))
    kept = frame["keep"].fillna(False).to_numpy(dtype=bool)
    outcome = [{"kind": k, "samples": int((kind == k).sum()), "kept": int((kept & (kind == k)).sum())}
               for k in sorted(set(kind))]
    return {"per_filter": per_filter, "by_detail": by_detail, "outcome": outcome,
            "clean_flagged_by_quality_filters": int((quality & clean).sum()),
            "clean_flagged_by_quality_filters_rate": _rate(quality & clean, clean),
            "clean_samples": int(clean.sum())}


def _rate(hit: np.ndarray, of: np.ndarray) -> float | None:
    """hit's count over of's, unrounded: the reports round once, when they print it."""
    n = int(of.sum())
    return float(hit.sum()) / n if n else None


# Captions --------------------------------------------------------------------------------------
_COLOR = "|".join(COLORS)
_GRAMMAR = re.compile(rf"\b({_COLOR}) ({'|'.join(SHAPES)})\b")
_BACKGROUND = re.compile(rf"\b({_COLOR}) background\b")


def parse_caption(text: str) -> dict:
    """The shape colour, shape, background and place a caption names (None where it names none)."""
    text = (text or "").lower()
    m, b = _GRAMMAR.search(text), _BACKGROUND.search(text)
    place = next((p for p in PLACES if p in text), None)
    return {"color": m.group(1) if m else None, "shape": m.group(2) if m else None,
            "background": b.group(1) if b else None, "place": place}


def caption_metrics(captions: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """`captions`: key, url, caption_long, fallback_reason for the kept samples. Accuracy counts a
    fallback as a miss; `generated_*` is over the generated captions only."""
    frame = captions.join(truth[["kind", "shape", "color", "background", "place"]], on="url")
    frame = frame[frame["shape"].notna()]
    n = len(frame)
    generated = frame["fallback_reason"].fillna("") == ""
    parsed = pd.DataFrame([parse_caption(t) for t in frame["caption_long"]], index=frame.index)
    right = {f: ((parsed[f] == frame[f]) & generated).to_numpy() for f in ("color", "shape", "background", "place")}
    both = right["color"] & right["shape"]
    generated, everyone = generated.to_numpy(), np.ones(n, bool)
    g = int(generated.sum())
    out = {"samples": n, "generated": g, "fallback": n - g, "fallback_rate": _rate(~generated, everyone),
           "color_and_shape": int(both.sum()), "color_and_shape_rate": _rate(both, everyone),
           "generated_color_and_shape_rate": _rate(both, generated)}
    for f, hit in right.items():
        out[f"{f}_rate"] = _rate(hit, everyone)
    return out


# Tokenizer -------------------------------------------------------------------------------------
def reconstruction_metrics(vq, images: list, res: int) -> dict:
    """Mean absolute error (0-255) and PSNR of the VQ's reconstructions of `images` (PIL) at `res`."""
    import torch


    if not images:
        return {"resolution": res, "samples": 0}
    crops = np.stack([np.asarray(centre_crop(img.convert("RGB"), res), np.float32) for img in images])
    x = torch.from_numpy(crops).permute(0, 3, 1, 2) / 127.5 - 1
    with torch.inference_mode():
        recon = vq.decode(vq.encode(x)).clamp(-1, 1)
    back = ((recon.permute(0, 2, 3, 1).numpy() + 1) * 127.5)
    err = back - crops
    mse = (err ** 2).mean(axis=(1, 2, 3))
    psnr = 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))
    return {"resolution": res, "samples": len(images), "mae": round(float(np.abs(err).mean()), 3),
            "psnr": round(float(psnr.mean()), 3)}


def kept_images(store: ShardStore, limit: int) -> list:
    """Up to `limit` kept images (PIL), from the first selected shards."""
    from PIL import Image


    images = []
    for shard in store.done_shards("select"):
        table = read_decisions(store, shard).select(["key", "keep"]).to_pandas()
        keys = set(table.loc[table["keep"], "key"].head(limit - len(images)))
        members = read_samples(store, shard, keys)
        for key in sorted(members):
            data = next((members[key][e] for e in ("jpg", "jpeg", "png", "webp") if e in members[key]), None)
            if data:
                images.append(Image.open(io.BytesIO(data)))
        if len(images) >= limit:
            break
    return images


# Stage outputs ---------------------------------------------------------------------------------
def read_scores(store: ShardStore) -> pd.DataFrame:
    frames = [with_decisions(store, s, store.read_table("scores", f"{s}.parquet")).to_pandas()
              for s in store.done_shards("select")]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def read_captions(store: ShardStore) -> pd.DataFrame:
    frames = []
    for shard in store.done_shards("caption"):
        caps = store.read_table("captions", f"{shard}.parquet", columns=["key", "caption_long", "fallback_reason"])
        urls = store.read_table("scores", f"{shard}.parquet", columns=["key", "url"]).to_pandas()
        frames.append(caps.to_pandas().merge(urls, on="key", how="left"))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["key", "caption_long", "fallback_reason", "url"])


def update_report(store: ShardStore, section: str, metrics: dict) -> dict:
    report = store.read_json(*REPORT) if store.exists(*REPORT) else {}
    report[section] = metrics
    store.write_json(report, *REPORT)
    return report


def measure_filters(store: ShardStore, truth_file: str) -> dict:
    metrics = filter_metrics(read_scores(store), read_truth(truth_file), store.read_json("reports", "thresholds.json"))
    update_report(store, "filters", metrics)
    return metrics


def measure_captions(store: ShardStore, truth_file: str) -> dict:
    metrics = caption_metrics(read_captions(store), read_truth(truth_file))
    update_report(store, "captions", metrics)
    return metrics


def measure_tokenizer(store: ShardStore, vq_path: str, resolutions: list[int], samples: int = 32,
                      vq_config: str | None = None, ema: bool = False) -> dict:
    import os


    vq = load_vq(vq_path, None if os.path.isdir(vq_path) else vq_config, ema=ema).eval()
    images = kept_images(store, samples)
    metrics = {str(res): reconstruction_metrics(vq, [i for i in images if min(i.size) >= res], res)
               for res in resolutions}
    update_report(store, "tokenizer", metrics)
    return metrics


# Tables for the flow's artifacts and the report ------------------------------------------------
def filter_rows(metrics: dict) -> list[dict]:
    rows = [{"filter": r["filter"], "planted defect": r["defect"], "caught": f"{r['caught']} / {r['planted']}",
             "caught %": _pct(r["caught_rate"]), "clean flagged": f"{r['clean_flagged']} / {r['clean']}",
             "clean flagged %": _pct(r["clean_flagged_rate"])} for r in metrics["per_filter"]]
    rows.append({"filter": " + ".join(QUALITY_FILTERS), "planted defect": "", "caught": "", "caught %": "",
                 "clean flagged": f"{metrics['clean_flagged_by_quality_filters']} / {metrics['clean_samples']}",
                 "clean flagged %": _pct(metrics["clean_flagged_by_quality_filters_rate"])})
    return rows


def caption_rows(m: dict) -> list[dict]:
    return [{"kept samples": m["samples"], "right colour and shape %": _pct(m["color_and_shape_rate"]),
             "colour %": _pct(m["color_rate"]), "shape %": _pct(m["shape_rate"]),
             "background %": _pct(m["background_rate"]), "place %": _pct(m["place_rate"]),
             "fallback %": _pct(m["fallback_rate"])}]


def tokenizer_rows(m: dict) -> list[dict]:
    return [{"resolution": r["resolution"], "samples": r["samples"], "MAE (0-255)": r.get("mae", "-"),
             "PSNR (dB)": r.get("psnr", "-")} for r in m.values()]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def truth_section(report: dict) -> str:
    """The filter report's section on the truth: a table per measured part."""
    import html

    def table(rows: list[dict]) -> str:
        if not rows:
            return ""
        head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    parts = ["<h2>Against the truth</h2><p class=muted>The synthetic source planted these defects and "
             "recorded them in its truth file, which no stage reads. A sample counts as caught by every "
             "filter whose threshold it fails, whichever filter dropped it first.</p>"]
    if "filters" in report:
        parts.append(table(filter_rows(report["filters"])))
    if "captions" in report:
        parts.append("<h3>Captioner</h3>" + table(caption_rows(report["captions"])))
    if "tokenizer" in report:
        parts.append("<h3>Tokenizer</h3>" + table(tokenizer_rows(report["tokenizer"])))
    return "".join(parts)
