"""Selection: thresholds absolute or from distributions, near-duplicates across shards, an exact
target count with ties broken by key, one reason per sample, thresholds.json, rerun skipping."""
import hashlib
import json

import numpy as np
import pytest

from tessera.config.filters import FiltersConfig
from tessera.pipelines import score, select, select_reference, select_work
from tessera.core.store import ShardStore

# The select stage runs its per-shard work as Ray tasks.
pytestmark = pytest.mark.usefixtures("ray_local")

SOURCES = {"clip_score": {"source": "compute", "column": None},
           "aesthetic": {"source": "compute", "column": None},
           "watermark": {"source": "metadata", "column": "pwatermark"}}


def write_scores(store: ShardStore, shard: str, rows: list[dict], embeddings=None, sources=SOURCES) -> None:
    """A scored shard as the score stage leaves it (scores, embeddings, marker)."""
    columns = {k: [np.array([r.get(k) for r in rows], dtype=object if k in ("key", "error", "caption", "url") else None)]
               for k in rows[0]}
    if embeddings is not None:
        columns["embedding"] = [np.asarray(embeddings, dtype=np.float32)]
    summary = score.write_shard(store, shard, columns)
    store.mark_done(score.STAGE, shard, {**summary, "sources": sources})


def row(key, clip=0.3, aes=6.0, wm=0.1, **kw):
    base = {"key": key, "url": f"http://x/{key}.jpg", "caption": "a red circle in the center", "error": "",
            "original_width": 512, "original_height": 512, "short_side": 512.0, "aspect_ratio": 1.0,
            "caption_chars": 26, "caption_words": 6, "caption_letter_fraction": 1.0,
            "clip_score": clip, "aesthetic": aes, "pwatermark": wm}
    base.update(kw)
    return base


def cfg(**sections) -> FiltersConfig:
    tree = {"nsfw": {"source": "off"}, "dedup": {"enabled": False}, "watermark": {"source": "metadata"}}
    tree.update(sections)
    return FiltersConfig.model_validate(tree)


def decisions(store, shards):
    frame = select_reference.load_scores(store, shards, decisions=True)
    return dict(zip(frame["key"], frame["reason"]))


def test_each_sample_gets_the_first_failing_filters_reason(tmp_path):
    store = ShardStore(str(tmp_path))
    write_scores(store, "00000", [
        row("a"),
        row("b", clip=0.1, aes=2.0),                  # fails clip and aesthetic: clip comes first
        row("c", aes=2.0, wm=0.9),                    # aesthetic before watermark
        row("d", error="corrupt_image", clip=np.nan, aes=np.nan),
        row("e", clip=np.nan),                        # a NaN score is dropped, never kept
        row("f", caption="", caption_chars=0, caption_words=0, clip=0.1),
        row("g", short_side=100.0, wm=None),
    ])
    result = select.run(cfg(), store)
    assert decisions(store, ["00000"]) == {"a": "", "b": "low_clip_score", "c": "low_aesthetic",
                                           "d": "corrupt_image", "e": "clip_score_missing",
                                           "f": "caption_empty", "g": "too_small"}
    assert result.kept == 1 and result.kept + sum(result.dropped.values()) == result.samples == 7
    funnel = result.funnel()
    assert funnel[0] == {"stage": "select", "outcome": "kept", "reason": "", "count": 1}
    assert sum(r["count"] for r in funnel) == 7
    assert store.is_done("select", "00000")
    # Decisions go to select's own file; the scores file stays as the score stage wrote it.
    stored = store.read_table("scores", "00000.parquet").to_pandas().set_index("key")
    assert stored.loc["b", "url"] == "http://x/b.jpg" and stored.loc["f", "caption"] == ""
    assert not {"keep", "reason", "duplicate_of"} & set(stored.columns)
    decided = store.read_table("select", "00000.parquet").to_pandas().set_index("key")
    assert decided.loc["c", "reason"] == "low_aesthetic" and bool(decided.loc["a", "keep"])
    assert list(decided.index) == list(stored.index)
    # The passes' compact scores files go once the decisions are written.
    assert not store.exists(select_work.COMPACT) and not store.exists("semdedup")


def test_target_count_is_exact_with_ties_broken_by_key(tmp_path):
    store = ShardStore(str(tmp_path))
    # Scores tie at 0.5 across shards; the target boundary falls inside the tie.
    write_scores(store, "00000", [row("k05", clip=0.9), row("k03", clip=0.5), row("k09", clip=0.5)])
    write_scores(store, "00001", [row("k01", clip=0.5), row("k07", clip=0.2), row("k02", clip=0.5)])
    result = select.run(cfg(clip_score={"min": 0.0}, target={"count": 3, "rank_by": "clip_score"}), store)
    kept = sorted(k for k, r in decisions(store, ["00000", "00001"]).items() if r == "")
    assert kept == ["k01", "k02", "k05"]  # 0.9, then the two lowest keys among the 0.5 ties
    assert result.kept == 3 and result.dropped == {"below_target": 3}
    thresholds = store.read_json("reports", "thresholds.json")
    assert thresholds["target"] == {"requested": 3, "rank_by": "clip_score", "kept": 3, "threshold": 0.5, "keep_if": ">="}


def test_target_fraction_and_lower_is_better_ranking(tmp_path):
    store = ShardStore(str(tmp_path))
    write_scores(store, "00000", [row(f"k{i}", wm=w) for i, w in enumerate([0.4, 0.1, 0.3, 0.2])])
    result = select.run(cfg(target={"fraction": 0.5, "rank_by": "pwatermark"}), store)
    assert result.kept == 2
    assert sorted(k for k, r in decisions(store, ["00000"]).items() if not r) == ["k1", "k3"]


def test_keep_fraction_chooses_the_threshold_from_the_distribution(tmp_path):
    store = ShardStore(str(tmp_path))
    write_scores(store, "00000", [row(f"k{i}", aes=float(i)) for i in range(10)])
    result = select.run(cfg(aesthetic={"keep_fraction": 0.3}), store)
    assert result.kept == 3
    assert result.thresholds["filters"]["aesthetic"]["threshold"] == 7.0
    assert result.thresholds["filters"]["aesthetic"]["mode"] == "keep_fraction 0.3"


def test_near_duplicates_across_shards_keep_the_lowest_key(tmp_path):
    store = ShardStore(str(tmp_path))
    e = np.eye(4, dtype=np.float32)
    write_scores(store, "00000", [row("k4"), row("k2"), row("k9", clip=0.0)], embeddings=[e[0], e[1], e[2]])
    write_scores(store, "00001", [row("k3"), row("k1")], embeddings=[e[0], e[2]])
    select.run(cfg(dedup={"enabled": True, "min_similarity": 0.99}), store)
    frame = select_reference.load_scores(store, ["00000", "00001"], decisions=True).set_index("key")
    # k3 and k4 are the same image: k3 kept. k9 matches k1 but was already dropped by CLIP score,
    # so k1 is not a duplicate of anything kept.
    assert frame.loc["k4", "reason"] == "near_duplicate" and frame.loc["k4", "duplicate_of"] == "k3"
    assert frame.loc["k3", "reason"] == "" and frame.loc["k1", "reason"] == "" and frame.loc["k2", "reason"] == ""
    assert frame.loc["k9", "reason"] == "low_clip_score"


def test_rerun_skips_until_something_changes(tmp_path):
    store = ShardStore(str(tmp_path))
    write_scores(store, "00000", [row("a"), row("b", clip=0.1)])
    select.run(cfg(), store)
    stamp = store.read_json("reports", "thresholds.json")["fingerprint"]
    mtime = store.fs.modified(store.path("select", "00000.parquet"))
    again = select.run(cfg(), store)
    assert again.kept == 1 and store.fs.modified(store.path("select", "00000.parquet")) == mtime
    changed = select.run(cfg(clip_score={"min": 0.05}), store)
    assert changed.kept == 2 and store.read_json("reports", "thresholds.json")["fingerprint"] != stamp


def test_clear_errors_for_scores_that_were_never_computed(tmp_path):
    store = ShardStore(str(tmp_path))
    with pytest.raises(ValueError, match="no scored shards"):
        select.run(cfg(), store)
    write_scores(store, "00000", [row("a")])
    with pytest.raises(ValueError, match="filters.nsfw is on but the shards were scored without it"):
        select.run(cfg(nsfw={"source": "compute"}), store)
    with pytest.raises(ValueError, match="embeddings"):
        select.run(cfg(dedup={"enabled": True}), store)


def test_a_score_missing_everywhere_drops_every_sample_with_its_reason(tmp_path):
    store = ShardStore(str(tmp_path))
    sources = {**SOURCES, "aesthetic": {"source": "missing", "column": "aesthetic"}}
    write_scores(store, "00000", [row("a", aes=np.nan), row("b", aes=np.nan, clip=0.1)], sources=sources)
    result = select.run(cfg(aesthetic={"source": "metadata", "on_missing_column": "drop", "keep_fraction": 0.5}), store)
    assert decisions(store, ["00000"]) == {"a": "aesthetic_missing", "b": "low_clip_score"}
    assert result.thresholds["filters"]["aesthetic"]["mode"] == "keep_fraction 0.5 (no valid scores)"


def test_the_selection_fingerprint_digests_its_inputs_one_batch_of_markers_at_a_time(tmp_path, monkeypatch):
    """The digest of one JSON text of config, markers and shards, read a batch at a time: what a
    selection made before markers were read in batches was stamped with, so it is kept."""
    store = ShardStore(str(tmp_path))
    shards = ["00000", "00001", "00002"]
    for i, shard in enumerate(shards):
        write_scores(store, shard, [row(f"{shard}{j}", clip=0.1 * j) for j in range(i + 1)])
    config = cfg()
    infos = [{k: v for k, v in store.done_info(score.STAGE, s).items() if k != "seconds"} for s in shards]
    text = json.dumps({"cfg": config.model_dump(mode="json"), "shards": shards, "infos": infos}, sort_keys=True)
    monkeypatch.setattr(select, "MARKER_BATCH", 2)  # two batches
    assert select.fingerprint(config, store, shards) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert select.fingerprint(config, store, shards[:2]) != select.fingerprint(config, store, shards)
    store.write_bytes(b"{not json", score.STAGE, "00001.done")
    with pytest.raises(ValueError, match="00001.done: the score marker is unreadable"):
        select.fingerprint(config, store, shards)
