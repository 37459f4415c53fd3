"""report.html: self-contained, with the funnel, sources, a histogram per score with its threshold
marked, and example images on both sides of each threshold."""
import re

import numpy as np
import pandas as pd
import pytest

from tessera.pipelines import filter_report, score, select
from tessera.core.store import ShardStore

from .fixtures import write_download_shard
from .test_select import cfg, row, write_scores

pytestmark = pytest.mark.usefixtures("ray_local")


def build(tmp_path):
    store = ShardStore(str(tmp_path))
    rows = write_download_shard(store, "00000", n=8)
    clip = [0.9, 0.8, 0.35, 0.31, 0.25, 0.2, 0.1, np.nan]
    e = np.eye(8, dtype=np.float32)
    e[1] = e[0]  # a near-duplicate pair
    write_scores(store, "00000", [row(r["key"], clip=c, aes=6.0 + i / 10, wm=0.05 * i, caption=r["caption"])
                                  for i, (r, c) in enumerate(zip(rows, clip))], embeddings=e)
    result = select.run(cfg(clip_score={"min": 0.3}, dedup={"enabled": True, "min_similarity": 0.99},
                            target={"count": 2, "rank_by": "aesthetic"}), store)
    funnel = [{"stage": "download", "outcome": "downloaded", "reason": "", "count": 8}] + result.funnel()
    return store, filter_report.build(store, funnel, examples=3), result


def test_report_is_one_self_contained_page(tmp_path):
    store, url, _ = build(tmp_path)
    assert url == store.url("reports", "report.html")
    page = open(url).read()
    assert page.startswith("<!doctype html>") and page.endswith("</html>")
    # Nothing is fetched from anywhere: no scripts, no external stylesheets or images.
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"""src=['"](?!data:image/jpeg;base64,)""", page)
    assert len(re.findall(r"src='data:image/jpeg;base64,", page)) >= 4


def test_report_shows_funnel_sources_histograms_and_thresholds(tmp_path):
    _, url, result = build(tmp_path)
    page = open(url).read()
    for stage, outcome, reason in (("download", "downloaded", ""), ("select", "kept", ""),
                                   ("select", "dropped", "low_clip_score"), ("select", "dropped", "below_target")):
        assert f"<td>{stage}</td><td>{outcome}</td><td>{reason}</td>" in page
    assert result.dropped["low_clip_score"] == 3 and result.dropped["clip_score_missing"] == 1
    assert "input column &#x27;pwatermark&#x27;" in page and "computed by the model" in page
    # One histogram per score, each threshold a dashed line labelled with its value.
    for title in ("CLIP image-text score", "Aesthetic score", "Watermark probability", "Original short side"):
        assert f"aria-label='{title}" in page
    assert "threshold 0.3</text>" in page and "target " in page and "stroke-dasharray" in page


def test_report_has_examples_on_both_sides_of_each_threshold(tmp_path):
    store, url, _ = build(tmp_path)
    page = open(url).read()
    section = page.split("<h3>clip_score &gt;= 0.3</h3>")[1].split("<h3>")[0]
    assert "clip_score 0.31" in section and "clip_score 0.25" in section
    assert section.count("class='card dropped'") >= 1 and "<b>low_clip_score</b>" in section
    # Each card carries its sample's caption, read from the download shard.
    captions = [s["caption"][:60] for s in score.read_shard(store, "00000")]
    assert any(caption in section for caption in captions)
    assert "near-duplicates" in page and "dup of" in page


def test_the_report_reads_only_the_score_columns_it_shows(tmp_path, monkeypatch):
    """Its per-shard work reads key, error and the thresholds' columns, not the whole scores shard."""
    store, _, _ = build(tmp_path)
    reads, real = [], ShardStore.read_table

    def recording(self, *parts, columns=None):
        reads.append((parts[0], set(columns) if columns is not None else None))
        return real(self, *parts, columns=columns)

    monkeypatch.setattr(ShardStore, "read_table", recording)
    grids = filter_report.example_grids(store.read_json("reports", "thresholds.json"))
    offered = filter_report.candidates(store, "00000", grids, 3)
    originals = filter_report.with_keys(store, "00000", set(offered[-1][1]["duplicate_of"]))
    shown = {g["column"] for g in grids} - {None}
    assert "clip_score" in shown and len(shown) < 4 and grids[-1]["column"] is None  # near-duplicates last
    assert [columns for folder, columns in reads if folder == "scores"] == [{"key", "error", *shown}, {"key", "error"}]
    assert originals["key"].tolist() == offered[-1][1]["duplicate_of"].tolist()  # the pair's original


def test_examples_near_a_threshold_break_ties_by_key_and_a_side_with_no_rows_offers_none():
    frame = pd.DataFrame({"key": ["b", "a", "c", "d"], "error": "", "keep": True, "reason": "",
                          "clip_score": [0.4, 0.4, 0.9, 0.35]})
    above, below = filter_report.near_threshold(frame, "clip_score", 0.3, True, "low_clip_score", 2)
    assert above["key"].tolist() == ["d", "a"] and below.empty  # nothing was dropped by it
    above, _ = filter_report.near_threshold(frame, "clip_score", 0.3, True, "low_clip_score", 3)
    assert above["key"].tolist() == ["d", "a", "b"]
