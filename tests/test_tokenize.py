import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from tessera.config.ray import RayConfig
from tessera.config.tokenize import TokenizeConfig
from tessera.models.refs import resolve
from tessera.models.vq import load_vq
from tessera.core import runtime
from tessera.pipelines import tokenize
from tessera.core.store import ShardStore
from tests.fixtures import write_download_shard, write_selection

CFG = dict(batch_size=4, flip=True, text_encoder="tiny:t5", text_max_length=16)


def _corrupt_member(store: ShardStore, shard: str, key: str) -> None:
    """Replace one sample's JPEG in a download tar by bytes that are no image."""
    src = io.BytesIO(store.fs.cat(store.path("download", f"{shard}.tar")))
    out = io.BytesIO()
    with tarfile.open(fileobj=src) as tin, tarfile.open(fileobj=out, mode="w") as tout:
        for m in tin:
            data = tin.extractfile(m).read()
            if m.name == f"{key}.jpg":
                data = b"\xff\xd8 this is not a jpeg"
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    store.write_bytes(out.getvalue(), "download", f"{shard}.tar")


def _tar(store, res, shard) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(fileobj=io.BytesIO(store.fs.cat(store.path(f"tokens/{res}", f"{shard}.tar")))) as t:
        for m in t:
            key, _, ext = m.name.partition(".")
            samples.setdefault(key, {})[ext] = t.extractfile(m).read()
    return samples


def _npy(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b))


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("tok")
    store = ShardStore(str(root / "data"))
    rows0 = write_download_shard(store, "00000", n=6)
    write_selection(store, "00000", rows0, [True, True, False, True, True, True])
    # Captions for shard 0, except for one kept sample.
    captioned = [r["key"] for r in rows0 if r["key"] != rows0[1]["key"]]
    store.write_table(pa.Table.from_pylist([
        {"key": k, "caption_long": f"A long caption of {k}. It has two sentences.", "caption_short": f"short {k}",
         "captioner": "tiny", "prompt": "p", "generation": "{}", "fallback_reason": ""} for k in captioned]),
        "captions", "00000.parquet")
    store.mark_done("caption", "00000")
    rows1 = write_download_shard(store, "00001", n=5, seed=1)
    _corrupt_member(store, "00001", rows1[2]["key"])
    ghost = dict(rows1[0], key="00001ghost")  # kept, but not in the download tar
    write_selection(store, "00001", rows1 + [ghost], [True] * 6)
    rows2 = write_download_shard(store, "00002", n=2, seed=2)
    write_selection(store, "00002", rows2, [False, False])  # nothing kept
    cfg = TokenizeConfig(**CFG)
    models = str(root / "models")
    result = tokenize.run(cfg, RayConfig(), store, models)
    return store, cfg, models, result, {"00000": rows0, "00001": rows1}


def _short(row) -> int:
    return min(row["original_width"], row["original_height"])


def test_counts_add_up_with_one_reason_each(tokenized):
    store, cfg, _, result, rows = tokenized
    kept = 5 + 6
    for res in (256, 512):
        c = result.per_resolution[res]
        assert c["rows_in"] == kept and c["shards"] == 3
        assert c["tokenized"] + sum(c["dropped"].values()) == kept
        assert c["dropped"]["corrupt_image"] == 1 and c["dropped"]["missing_from_download"] == 1
        small = sum(_short(r) < res for r, k in zip(rows["00000"], [1, 1, 0, 1, 1, 1]) if k) + \
            sum(_short(r) < res for i, r in enumerate(rows["00001"]) if i != 2)
        assert c["dropped"].get("too_small", 0) == small
        # Shard 0's uncaptioned sample (if large enough) and shard 1's samples have no caption.
        funnel = [r for r in result.funnel() if r["stage"] == f"tokenize_{res}"]
        assert sum(r["count"] for r in funnel) == kept
    assert result.per_resolution[256].get("dropped").get("too_small", 0) == 0  # every picture is >= 288 px


def test_shards_follow_the_contract(tokenized):
    store, cfg, models, _, rows = tokenized
    vq = load_vq(resolve("tiny:vq", models))
    by_key = {r["key"]: r for r in rows["00000"]}
    for res in (256, 512):
        samples = _tar(store, res, "00000")
        expected = {k for k, r in by_key.items() if k != rows["00000"][2]["key"] and _short(r) >= res}
        assert set(samples) == expected
        assert store.is_done(f"tokens/{res}", "00000")
        for key, files in samples.items():
            assert set(files) == {"codes.npy", "codes_flip.npy", "json", "t5.npy"}
            codes, flip = _npy(files["codes.npy"]), _npy(files["codes_flip.npy"])
            assert codes.dtype == np.uint16 and codes.shape == (res // 16, res // 16)
            assert int(codes.max()) < vq.config.codebook_size
            t5 = _npy(files["t5.npy"])
            assert t5.dtype == np.float16 and t5.ndim == 2 and t5.shape[1] == 32 and 1 <= t5.shape[0] <= 16
            meta = json.loads(files["json"])
            assert set(meta) == {"key", "caption", "caption_long", "caption_short", "url", "hash", "sha256", "scores"}
            assert meta["caption"] == by_key[key]["caption"] and meta["url"] == by_key[key]["url"]
            if key == rows["00000"][1]["key"]:
                assert meta["caption_long"] is None and meta["caption_short"] is None
            else:
                assert meta["caption_short"] == f"short {key}"
        # The codes are the tokenizer's codes of the centre crop, and of its mirror image.
        key = sorted(samples)[0]
        img = Image.open(io.BytesIO(_jpg(store, key)))
        crop = np.asarray(tokenize.centre_crop(img.convert("RGB"), res), dtype=np.float32) / 127.5 - 1
        x = torch.from_numpy(crop).permute(2, 0, 1)[None]
        assert np.array_equal(vq.encode(x)[0].numpy(), _npy(samples[key]["codes.npy"]))
        assert np.array_equal(vq.encode(x.flip(-1))[0].numpy(), _npy(samples[key]["codes_flip.npy"]))


def _jpg(store, key) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(store.fs.cat(store.path("download", f"{key[:5]}.tar")))) as t:
        return t.extractfile(f"{key}.jpg").read()


def test_manifest_and_empty_shard(tokenized):
    store, _, _, result, _ = tokenized
    for res in (256, 512):
        m = store.read_json(f"tokens/{res}", "manifest.json")
        assert m["samples"] == result.per_resolution[res]["tokenized"] > 0
        assert m["grid"] == [res // 16] * 2 and m["codebook_size"] == 512
        assert 0 < m["codes_used"] <= 512 and m["codebook_usage"] == pytest.approx(m["codes_used"] / 512, abs=1e-4)
        assert m["bytes_per_sample"] > (res // 16) ** 2 * 2
        assert sum(s["samples"] for s in m["shards"].values()) == m["samples"]
        assert _tar(store, res, "00002") == {}
        assert store.done_info(f"tokens/{res}", "00002")["rows_in"] == 0
        # The histogram is a sidecar beside the marker, and the manifest's usage is its sum.
        assert "code_counts" not in store.done_info(f"tokens/{res}", "00000")
        counts = sum(tokenize.unpack_counts(store.fs.cat_file(store.path(f"tokens/{res}", f"{s}.counts")))
                     .astype(np.int64) for s in ("00000", "00001", "00002"))
        assert int((counts > 0).sum()) == m["codes_used"] and counts.sum() == m["samples"] * (res // 16) ** 2


def test_rerun_skips_done_shards(tokenized, monkeypatch):
    store, cfg, models, result, _ = tokenized
    before = {s: os.path.getmtime(store.path("tokens/256", f"{s}.done")) for s in ("00000", "00001")}
    # Everything done: no shard is tokenized again (only the manifest's histogram sums run), same counts.
    submit = runtime._map

    def no_shard_work(desc, *args, stage=None, **kwargs):
        assert stage != tokenize.STAGE, "a finished run was redone"
        return submit(desc, *args, stage=stage, **kwargs)

    monkeypatch.setattr(runtime, "_map", no_shard_work)
    assert tokenize.run(cfg, RayConfig(), store, models).per_resolution == result.per_resolution
    assert {s: os.path.getmtime(store.path("tokens/256", f"{s}.done")) for s in before} == before


@pytest.mark.slow
def test_rerun_redoes_only_a_missing_resolution(tokenized):
    store, cfg, models, result, _ = tokenized
    before = {s: os.path.getmtime(store.path("tokens/256", f"{s}.done")) for s in ("00000", "00001")}
    store.fs.rm(store.path("tokens/512", "00001.done"))
    store.fs.rm(store.path("tokens/512", "00001.tar"))
    again = tokenize.run(cfg, RayConfig(), store, models)
    assert again.per_resolution == result.per_resolution
    assert store.exists("tokens/512", "00001.tar")
    assert {s: os.path.getmtime(store.path("tokens/256", f"{s}.done")) for s in before} == before


def test_config_rejects_bad_resolutions():
    with pytest.raises(ValueError, match="multiple of 16"):
        TokenizeConfig(resolutions=[250])
    with pytest.raises(ValueError, match="at least one"):
        TokenizeConfig(resolutions=[])
    assert TokenizeConfig(resolutions=[512, 128, 256, 256]).resolutions == [128, 256, 512]


def test_visual_check_puts_decoded_codes_under_their_originals(tokenized):
    from tessera.demo.visual_check import TILE, render

    store, _, models, _, _ = tokenized
    vq = load_vq(resolve("tiny:vq", models))
    grid = Image.open(io.BytesIO(render(store, vq, 256, count=3)))
    assert grid.size == (3 * TILE, 2 * TILE)
    px = np.asarray(grid, dtype=np.float32)
    top, bottom = px[:TILE], px[TILE:]
    # Each decoded tile is closer in colour to its own original than to its neighbours'.
    for i in range(3):
        own = np.abs(top[:, i * TILE:(i + 1) * TILE] - bottom[:, i * TILE:(i + 1) * TILE]).mean()
        other = np.abs(top[:, ((i + 1) % 3) * TILE:((i + 1) % 3 + 1) * TILE] - bottom[:, i * TILE:(i + 1) * TILE]).mean()
        assert own < other


def test_parquet_cells_become_plain_json():
    import pandas as pd

    cells = [pd.NA, float("nan"), np.float32("nan"), None, np.int64(3), np.float32(0.5), np.bool_(True), "x"]
    assert [tokenize._json_value(v) for v in cells] == [None, None, None, None, 3, 0.5, True, "x"]
    assert json.dumps([tokenize._json_value(v) for v in cells])
