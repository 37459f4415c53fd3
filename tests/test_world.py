"""The demo's world: planted defects, a complete truth file that no stage reads, held-out prompts."""
import ast
import io
import pathlib
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from tessera.config.download import SyntheticConfig
from tessera.demo import synthetic, world

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tessera"


def test_truth_has_one_row_per_source_row_and_every_kind(tmp_path):
    cfg = SyntheticConfig(num_images=400)
    pairs = synthetic.rows_with_truth(cfg, "http://127.0.0.1:1")
    synthetic.write_truth(pairs, str(tmp_path / "t.truth.parquet"))
    truth = pq.read_table(tmp_path / "t.truth.parquet").to_pandas()
    assert len(truth) == len(pairs) == len(synthetic.make_rows(cfg, "http://127.0.0.1:1"))
    assert truth["row_index"].tolist() == list(range(len(pairs)))
    assert truth["url"].tolist() == [row["URL"] for row, _ in pairs]
    kinds = Counter(truth["kind"])
    for kind in (*world.DEFECT_RATES, "clean", "crawl_fault", "odd_image", "caption_trouble"):
        assert kinds[kind] > 0, kind
    pictures = truth[truth["kind"].isin([*world.DEFECT_RATES, "clean"])]
    assert pictures[["shape", "color", "background", "place", "true_caption"]].notna().all().all()
    for reason in synthetic.expected_outcomes().values():
        assert reason in set(truth["detail"]), reason
    mismatched = pictures[pictures["kind"] == world.MISMATCHED_CAPTION]
    assert (mismatched["caption"] != mismatched["true_caption"]).all()
    clean = pictures[pictures["kind"] == "clean"]
    assert (clean["caption"] == clean["true_caption"]).all()
    assert (pictures[pictures["kind"] == world.NSFW]["punsafe"] >= 0.3).all()
    assert (clean["punsafe"] < 0.1).mean() > 0.99


def test_near_duplicates_copy_an_earlier_clean_picture_in_another_shard():
    for i in range(world.DUPLICATE_GAP, 600):
        s = world.world_sample(i, 0)
        if s.defect != world.NEAR_DUPLICATE:
            continue
        j = s.duplicate_of
        assert i - j >= world.DUPLICATE_GAP and world.defect_of(j, 0)[0] == world.CLEAN
        original = np.asarray(Image.open(io.BytesIO(world.image_bytes(j, 0))).convert("RGB").resize((64, 64)), float)
        copy = np.asarray(Image.open(io.BytesIO(world.image_bytes(i, 0))).convert("RGB").resize((64, 64)), float)
        assert np.abs(original - copy).mean() < 25, (i, j, s.detail)


def test_no_picture_or_caption_shows_a_held_out_combination():
    held = set(world.held_out_combos())
    assert len(held) == 8
    for i in range(2000):
        s = world.world_sample(i, 0)
        p = s.picture
        assert (p.shape, p.color, p.background) not in held
        assert all(f"a {c} {sh} " not in s.caption or f"on a {b} background" not in s.caption for sh, c, b in held)


def test_prompts_parquet_has_the_truth_of_each_held_out_prompt(tmp_path):
    path = synthetic.write_prompts(str(tmp_path / "prompts.parquet"))
    rows = pq.read_table(path).to_pylist()
    assert [(r["shape"], r["color"], r["background"]) for r in rows] == world.held_out_combos()
    for r in rows:
        assert r["prompt"] == f"a {r['color']} {r['shape']} {r['place']} on a {r['background']} background"
        assert tuple(r["color_rgb"]) == world.COLORS[r["color"]]


def test_the_source_writes_truth_and_prompts_beside_it_and_no_stage_reads_them(tmp_path):
    path = str(tmp_path / "src" / "laion-synthetic.parquet")
    with synthetic.SyntheticSource(SyntheticConfig(num_images=20, bad_records=False), path, 1.0):
        pass
    assert pq.read_metadata(synthetic.truth_path(path)).num_rows == pq.read_metadata(path).num_rows
    assert pq.read_metadata(synthetic.prompts_path(path)).num_rows == len(world.held_out_combos())
    # Only the source and the truth metrics know where the truth lives.
    readers = set()
    for file in PACKAGE.rglob("*.py"):
        names = {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(ast.parse(file.read_text()))
                 if isinstance(n, (ast.Name, ast.Attribute))}
        if "truth_path" in names:
            readers.add(file.relative_to(PACKAGE).as_posix())
    assert readers <= {"demo/synthetic.py", "demo/truth.py", "demo/truth_tasks.py"}


def test_tiny_tokenizers_are_trained_on_the_worlds_vocabulary():
    from tessera.models import tiny

    assert list(tiny.CAPTION_COLORS) == list(world.COLORS)
    assert list(tiny.CAPTION_SHAPES) == world.SHAPES
    assert list(tiny.CAPTION_PLACES) == world.PLACES
