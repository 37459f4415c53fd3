"""The distributed select equals the exact in-memory one: thresholds, the target with ties, every
reason, and near-duplicates found within k-means clusters equal to the all-pairs search, on data
spread over many shards. Also the sketches' rank error, and the exact settle of a boundary."""
import math

import numpy as np
import pandas as pd
import pytest
from datasketches import kll_doubles_sketch

from tessera.core import quantiles
from tessera.core.store import ShardStore
from tessera.pipelines import select, select_reference, select_work, semdedup
from tessera.pipelines.select_work import Plan

from .test_select import SOURCES, cfg, row, write_scores


def random_shards(store: ShardStore, rng, shards: int, per_shard: int, dim: int = 16, planted: int = 0,
                  threshold: float = 0.99, failures: bool = True) -> None:
    """Scores with ties (two decimals), NaNs, unreadable rows and rule failures, and unit embeddings
    with `planted` groups of near-duplicates spread over different shards (some as chains a~b~c
    where a and c alone are not near-duplicates)."""
    n = shards * per_shard
    keys = rng.permutation(n)
    emb = rng.normal(size=(n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    theta = math.acos(threshold) * 0.9  # a step just inside the threshold; two steps are outside
    picked = rng.permutation(n)  # random rows: random shards, random key order
    for g in range(planted):
        u, v = np.linalg.qr(rng.normal(size=(dim, 2)))[0].T
        members = picked[3 * g:3 * g + 3]
        steps = [0, 1, 2] if g % 2 else [0, 1, 1]
        for m, s in zip(members, steps):
            emb[m] = math.cos(s * theta) * u + math.sin(s * theta) * v
    for s in range(shards):
        rows = []
        for i in range(s * per_shard, (s + 1) * per_shard):
            kw = {}
            r = rng.random() if failures else 1.0
            if r < 0.04:
                kw = {"error": "corrupt_image", "clip": np.nan, "aes": np.nan}
            elif r < 0.07:
                kw = {"caption": "", "caption_chars": 0, "caption_words": 0}
            elif r < 0.10:
                kw = {"short_side": 64.0}
            rows.append(row(f"k{keys[i]:06d}", **{"clip": round(rng.uniform(0.1, 0.5), 2),
                                                 "aes": round(rng.normal(5.5, 1.0), 1),
                                                 "wm": np.nan if r < 0.12 else round(rng.random(), 2),
                                                 **kw}))
        order = np.argsort([r["key"] for r in rows])
        write_scores(store, f"{s:05d}", [rows[j] for j in order],
                     embeddings=emb[s * per_shard:(s + 1) * per_shard][order])


def decisions(store, shards) -> pd.DataFrame:
    frame = select_reference.load_scores(store, shards, decisions=True)
    return frame[["shard", "key", "keep", "reason", "duplicate_of"]].reset_index(drop=True)


def run_against_reference(c, store):
    """select.run's decisions, checked equal to the in-memory reference's; returns both summaries and
    the decisions."""
    shards = store.done_shards("score")
    exact, expected = select_reference.exact_reference(c, store)
    result = select.run(c, store)
    got = decisions(store, shards)
    pd.testing.assert_frame_equal(got, exact[["shard", "key", "keep", "reason", "duplicate_of"]]
                                  .reset_index(drop=True).astype(got.dtypes.to_dict()))
    return result, expected, got


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("target", [{"count": 150, "rank_by": "clip_score"},
                                    {"fraction": 0.25, "rank_by": "pwatermark"}])
def test_distributed_select_equals_the_exact_one(tmp_path, target):
    store = ShardStore(str(tmp_path))
    random_shards(store, np.random.default_rng(7), shards=6, per_shard=120, planted=6)
    # A tiny sketch (k=8) and a tiny gather bound force the approximate path: several narrowing
    # rounds before each boundary is settled from the rows near it.
    c = cfg(clip_score={"min": 0.2}, aesthetic={"keep_fraction": 0.6}, watermark={"keep_fraction": 0.9},
            dedup={"enabled": True, "min_similarity": 0.99, "n_clusters": 3, "partitions": 2},
            target=target, sketch_k=8, max_gather=12)
    result, expected, got = run_against_reference(c, store)
    assert result.dropped == expected["dropped"] and result.kept == expected["kept"]
    for name in ("clip_score", "aesthetic", "watermark"):
        assert result.thresholds["filters"][name] == expected["filters"][name]
    assert result.thresholds["target"] == expected["target"]
    assert {"near_duplicate", "below_target", "low_aesthetic", "watermark", "pwatermark_missing", "caption_empty",
            "too_small", "corrupt_image", "low_clip_score"} <= set(result.dropped)


@pytest.mark.usefixtures("ray_local")
def test_semantic_dedup_finds_the_planted_cross_shard_duplicates(tmp_path):
    store = ShardStore(str(tmp_path))
    random_shards(store, np.random.default_rng(3), shards=8, per_shard=60, dim=24, planted=20, failures=False)
    c = cfg(clip_score={"min": 0.0}, aesthetic={"min": 0.0}, watermark={"max": 1.0},
            dedup={"enabled": True, "min_similarity": 0.99, "n_clusters": 4, "partitions": 3})
    shards = store.done_shards("score")
    exact, _ = select_reference.exact_reference(c, store)
    result = select.run(c, store)
    got = decisions(store, shards)
    assert got["duplicate_of"].tolist() == exact["duplicate_of"].tolist()
    assert got["reason"].tolist() == exact["reason"].tolist()
    # 20 planted groups of 3 (10 of them chains whose ends alone are not near-duplicates): 40 copies.
    dups = got[got["reason"] == "near_duplicate"]
    assert len(dups) == 40 and dups["shard"].nunique() > 4
    assert result.thresholds["dedup"]["clusters"] == 4 and result.thresholds["dedup"]["spilled"] > 0


def test_a_merged_sketch_is_within_its_stated_rank_error():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(size=60_000), rng.exponential(size=40_000)])
    k = 200
    assert quantiles.rank_error(k) == pytest.approx(0.0133, abs=1e-4)
    merged = quantiles.merge([quantiles.sketch(part, k) for part in np.array_split(rng.permutation(values), 50)], k)
    assert merged.n == len(values) and merged.is_estimation_mode()
    ordered = np.sort(values)
    for rank in np.linspace(0.01, 0.99, 25):
        q = merged.get_quantile(rank)
        true_rank = np.searchsorted(ordered, q, side="right") / len(values)
        assert abs(true_rank - rank) <= quantiles.rank_error(k)
    # Up to k values the sketch is exact.
    small = quantiles.merge([quantiles.sketch(values[:100], k), quantiles.sketch(values[100:150], k)], k)
    assert not small.is_estimation_mode() and small.get_quantile(1.0) == values[:150].max()


@pytest.mark.parametrize("k,max_gather", [(8, 5), (200, 1000), (8, 100_000)])
def test_settle_finds_the_exact_row_of_each_rank(k, max_gather):
    rng = np.random.default_rng(k + max_gather)
    shards = [(np.round(rng.normal(size=n), 1), np.array([f"s{i}-{j:04d}" for j in range(n)], dtype=object))
              for i, n in enumerate(rng.integers(0, 400, size=12))]
    shards[3][0][:5] = np.inf  # missing scores rank last
    values = np.concatenate([v for v, _ in shards])
    keys = np.concatenate([key for _, key in shards])
    order = np.lexsort((keys, values))
    sk = quantiles.merge([quantiles.sketch(v, k) for v, _ in shards], k)
    rounds = []

    def query(windows):
        rounds.append(windows)
        out = {}
        for name, (lo, hi, gather) in windows.items():
            tally = quantiles.Tally(k)
            for v, key in shards:
                tally.add(quantiles.in_window(v, key, lo, hi, k, gather))
            out[name] = tally.result()
        return out

    ranks = [1, 2, 37, len(values) // 2, len(values) - 6, len(values)]
    problems = {str(r): quantiles.Problem(rank=r, total=len(values), sketch=kll_doubles_sketch.deserialize(sk.serialize()))
                for r in ranks}
    answers = quantiles.settle(problems, query, max_gather)
    for r in ranks:
        assert answers[str(r)] == (values[order[r - 1]], keys[order[r - 1]])
    # Every gathered window held at most about max_gather rows unless ties forced more.
    assert len(rounds) >= (3 if max_gather == 5 else 1)


def test_a_group_split_across_clusters_is_joined_through_the_spilled_member(tmp_path):
    """c ~ b ~ a along an arc (a and c alone are not near-duplicates), the two centroids on either
    side: b lies near the boundary. Spilled into both clusters, b joins the two halves of the group
    across partitions, and the lowest key (c) is kept for all three, as the all-pairs search says.
    Without the spill the group splits: the known approximation of searching within clusters."""
    def at(degrees):
        v = np.zeros(4, np.float32)
        v[0], v[1] = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
        return v

    store = ShardStore(str(tmp_path))
    write_scores(store, "00000", [row("k2"), row("k9")], embeddings=[at(30), at(-80)])  # a, and one far away
    write_scores(store, "00001", [row("k1"), row("k3")], embeddings=[at(60), at(44)])   # c, b
    c = cfg(dedup={"enabled": True, "min_similarity": 0.95})
    exact, _ = select_reference.exact_reference(c, store)
    assert dict(zip(exact["key"], exact["duplicate_of"])) == {"k1": "", "k2": "k1", "k3": "k1", "k9": ""}
    centroids = np.stack([at(0), at(90)])
    for shard in ("00000", "00001"):  # what select's first pass leaves for the later ones
        select_work.write_compact(store, shard, select_work.scores_table(store, shard))

    def semantic(margin):
        if store.exists(semdedup.DEDUP):
            store.fs.rm(store.path(semdedup.DEDUP), recursive=True)
        plan = Plan(c, SOURCES)
        shards, partitions = ["00000", "00001"], ["00000", "00001"]
        spilled = select_work.dedup_assign(store, "00000", plan, shards, centroids, margin, 2)["spilled"]
        found = [semdedup.search(store, p, ["00000"], 1, 0.95, 100, 64, margin, 5) for p in partitions]
        semdedup.merge(store, "all", partitions)
        semdedup.resolve(store, "00000", partitions, 1)
        keys = {s: store.read_table("scores", f"{s}.parquet").column("key").to_numpy(zero_copy_only=False)
                for s in shards}
        dup = {k: d for s in keys for k, d in zip(keys[s], semdedup.duplicates(store, s, keys[s], 1)[1])}
        return dup, spilled, sum(f["bridges"] for f in found)

    dup, spilled, bridges = semantic(margin=0.05)
    assert dup == {"k1": "", "k2": "k1", "k3": "k1", "k9": ""} and spilled == 1 and bridges == 2
    dup, spilled, _ = semantic(margin=0.0)
    assert spilled == 0 and dup == {"k1": "", "k2": "", "k3": "k2", "k9": ""}


def test_tiled_components_equal_the_groups_of_the_full_similarity_graph():
    """Groups from tiles (with the pairs inside an already-formed group skipped) equal the
    connected components of the full cosine graph: a dense group of 300 copies, chains, noise."""
    from scipy.sparse.csgraph import connected_components

    from tessera.filters.dedup import components, normalized

    rng = np.random.default_rng(5)
    dim = 12
    emb = rng.normal(size=(700, dim))
    emb[:300] = rng.normal(size=dim) + rng.normal(scale=0.01, size=(300, dim))  # one placeholder
    base = rng.normal(size=dim)
    for i in range(300, 340):  # a chain: each step joins the next, the ends are far apart
        emb[i] = base + (i - 300) * 0.12 * np.eye(dim)[0]
    emb = emb[rng.permutation(len(emb))]
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    t = 0.99
    sims = normalized(unit) @ normalized(unit).T
    _, comp = connected_components(sims.numpy() >= t, directed=False)
    lowest = np.full(comp.max() + 1, len(emb))
    np.minimum.at(lowest, comp, np.arange(len(emb)))
    for block in (7, 64, 1024):
        got = components(normalized(unit), t, block)
        assert (got == lowest[comp]).all()
    assert np.bincount(lowest[comp]).max() >= 300


def skewed_shards(store: ShardStore, rng, shards: int, per_shard: int, dim: int = 16) -> None:
    """Zipf-sized clusters, one placeholder group of many near-identical copies, 1 in 50 rows an
    exact copy (same sha256, same embedding) of a row of another shard, planted near-duplicate
    pairs; keys in random order over the shards."""
    n = shards * per_shard
    centers = rng.normal(size=(8, dim))
    sizes = 1.0 / np.arange(1, 9) ** 1.2
    cluster = rng.choice(8, size=n, p=sizes / sizes.sum())
    emb = centers[cluster] + rng.normal(scale=0.5, size=(n, dim))
    placeholder = rng.permutation(n)[: n // 4]
    emb[placeholder] = centers[0] + rng.normal(scale=0.002, size=(len(placeholder), dim))
    rest = np.setdiff1d(np.arange(n), placeholder)
    pairs = rng.permutation(rest)[:40].reshape(20, 2)
    emb[pairs[:, 1]] = emb[pairs[:, 0]] + rng.normal(scale=0.01, size=(20, dim))
    sha = np.array([f"{i:064x}" for i in range(n)], dtype=object)
    copies = rng.permutation(rest)[: n // 50 * 2].reshape(-1, 2)
    emb[copies[:, 1]] = emb[copies[:, 0]]
    sha[copies[:, 1]] = sha[copies[:, 0]]
    sha[rng.permutation(n)[:5]] = None  # no hash: never an exact copy
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    keys = rng.permutation(n)
    for s in range(shards):
        rows = range(s * per_shard, (s + 1) * per_shard)
        table = [row(f"k{keys[i]:06d}", clip=round(rng.uniform(0.25, 0.5), 2), sha256=sha[i]) for i in rows]
        order = np.argsort([r["key"] for r in table])
        write_scores(store, f"{s:05d}", [table[j] for j in order], embeddings=emb[list(rows)][order])


@pytest.mark.usefixtures("ray_local")
def test_skewed_dedup_with_exact_copies_and_a_split_cluster_equals_the_exact_one(tmp_path):
    store = ShardStore(str(tmp_path))
    skewed_shards(store, np.random.default_rng(11), shards=6, per_shard=150)
    c = cfg(clip_score={"min": 0.3},
            dedup={"enabled": True, "min_similarity": 0.99, "n_clusters": 3, "partitions": 2, "spill_margin": 0.3,
                   "max_cluster_size": 120, "block": 32, "shards_per_task": 4},
            target={"count": 300, "rank_by": "clip_score"})
    result, expected, got = run_against_reference(c, store)
    assert result.dropped == expected["dropped"]
    dedup = result.thresholds["dedup"]
    assert dedup["split"] >= 1 and dedup["largest_cluster"] > 120 and dedup["tasks"] == 2
    assert expected["dropped"]["exact_duplicate"] >= 10 and expected["dropped"]["near_duplicate"] >= 150
    copies = got[got["reason"] == "exact_duplicate"]
    assert (copies["duplicate_of"] < copies["key"]).all()
    # Two exchange tasks and two partitions: a handful of files per pass, not one per shard and partition.
    assert dedup["files_written"] <= 2 + 2 + 2 + 2 * 2 + 2
