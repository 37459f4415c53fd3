"""Inputs that are read, not downloaded: an image folder, img2dataset/WebDataset tars, Hugging Face
parquet. Each becomes the download stage's outputs, with every bad file counted under its reason."""
from __future__ import annotations

import io
import json
import os
import tarfile
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tessera.config.download import DownloadConfig, SourceConfig
from tessera.pipelines import ingest, intake, sources
from tessera.core.store import ShardStore
from tessera.demo.synthetic import draw, encode, picture, png_bomb

CFG = dict(shard_size=5, image_size=256, thread_count=2)


def jpg(i: int) -> bytes:
    return encode(draw(picture(i, 0)), "JPEG", quality=90)


def caption(i: int) -> str:
    return picture(i, 0).caption


def run_shards(source: SourceConfig, root, **cfg) -> tuple[ShardStore, dict]:
    """prepare + ingest_shard on every shard, in this process (the stage's work without Ray)."""
    store = ShardStore(str(root))
    cfg = DownloadConfig(**{**CFG, **cfg})
    totals = {"rows_in": 0, "downloaded": 0, "dropped": {}}
    for shard in ingest.prepare(source, cfg, store):
        info = ingest.ingest_shard(store, shard, source=source, cfg=cfg)
        store.mark_done("download", shard, info)
        totals["rows_in"] += info["rows_in"]
        totals["downloaded"] += info["downloaded"]
        for reason, n in info["dropped"].items():
            totals["dropped"][reason] = totals["dropped"].get(reason, 0) + n
    return store, totals


def outputs(store: ShardStore) -> tuple[dict[str, dict], list[dict], list[dict]]:
    """Samples in the tars (key -> {ext: bytes}), status rows, rejected rows, over every shard."""
    samples, status, rejected = {}, [], []
    for shard in store.done_shards("download"):
        with tarfile.open(fileobj=io.BytesIO(store.fs.cat(store.path("download", f"{shard}.tar")))) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
        status += store.read_table("download", f"{shard}.parquet").to_pylist()
        rejected += store.read_table("download", f"{shard}_rejected.parquet").to_pylist()
        stats = store.read_json("download", f"{shard}_stats.json")
        assert stats["count"] == len(store.read_table("download", f"{shard}.parquet"))
    return samples, status, rejected


def check_contract(store: ShardStore, totals: dict) -> None:
    """What every later stage relies on: keys unique, tar samples = success rows, counts add up."""
    samples, status, rejected = outputs(store)
    ok = {r["key"]: r for r in status if r["status"] == "success"}
    assert set(samples) == set(ok)
    assert len({r["key"] for r in status}) == len(status)
    for key, files in samples.items():
        assert set(files) == {"jpg", "txt", "json"}
        meta = json.loads(files["json"])
        assert meta["key"] == key and meta["caption"] == files["txt"].decode() and meta["sha256"]
        assert meta["original_width"] and meta["width"]
    assert totals["rows_in"] == len(status) + len(rejected)
    assert totals["downloaded"] == len(ok)
    assert totals["downloaded"] + sum(totals["dropped"].values()) == totals["rows_in"]
    indices = [r["row_index"] for r in status + rejected]
    assert len(set(indices)) == len(indices)


# Image folder -------------------------------------------------------------------------------
@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    (root / "a" / "b").mkdir(parents=True)
    files = {
        "a/one.jpg": jpg(1), "a/one.txt": caption(1).encode(),
        "a/b/two.png": encode(draw(picture(2, 0)), "PNG"),
        "a/b/two.json": json.dumps({"caption": caption(2), "similarity": 0.31}).encode(),
        # Both sidecars: the .txt comes first by default.
        "three.jpg": jpg(3), "three.txt": b"from the txt",
        "three.json": json.dumps({"caption": "from the json"}).encode(),
        "four.webp": encode(draw(picture(4, 0)), "WEBP"), "four.json": json.dumps({"text": caption(4)}).encode(),
        "nocaption.jpg": jpg(5),
        "emptycaption.jpg": jpg(6), "emptycaption.txt": b"  \n",
        "corrupt.jpg": jpg(7)[:300], "corrupt.txt": b"half a jpeg",
        "notanimage.jpg": b"hello, I am text", "notanimage.txt": b"text with a jpg name",
        "tiny.png": encode(draw(picture(8, 0)).resize((20, 20)), "PNG"), "tiny.txt": b"too small",
        "wide.jpg": encode(draw(picture(9, 0)).resize((800, 100)), "JPEG"), "wide.txt": b"too wide",
        "bomb.png": png_bomb(10_000), "bomb.txt": b"a bomb",
        "README.md": b"# my photos",
        "orphan.txt": b"a caption without its image",
        ".hidden.jpg": b"ignored",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


IMAGE_FOLDER_REASONS = {"missing_caption": 2, "corrupt_image": 1, "not_an_image": 2, "image_too_small": 1,
                        "aspect_ratio": 1, "decompression_bomb": 1, "missing_image": 1}


def test_image_folder_reads_sidecars_and_counts_bad_files(image_folder, tmp_path):
    source = SourceConfig(kind="image_folder", path=str(image_folder))
    store, totals = run_shards(source, tmp_path / "data")
    assert totals["downloaded"] == 4 and totals["dropped"] == IMAGE_FOLDER_REASONS
    assert totals["rows_in"] == 4 + sum(IMAGE_FOLDER_REASONS.values())
    check_contract(store, totals)
    samples, status, rejected = outputs(store)
    by_url = {os.path.relpath(r["url"], image_folder): r for r in status + rejected}
    assert by_url["README.md"]["reason"] == "not_an_image" and by_url["orphan.txt"]["reason"] == "missing_image"
    assert ".hidden.jpg" not in by_url
    assert intake.reason_for(by_url["corrupt.jpg"]["error_message"]) == "corrupt_image"
    captions = {os.path.relpath(r["url"], image_folder): r["caption"] for r in status if r["status"] == "success"}
    assert captions == {"a/one.jpg": caption(1), "a/b/two.png": caption(2), "three.jpg": "from the txt",
                        "four.webp": caption(4)}
    # A field of the json sidecar listed in columns.carry rides along, as a download's would.
    assert by_url["a/b/two.png"]["similarity"] == pytest.approx(0.31)
    meta = json.loads(samples[by_url["a/b/two.png"]["key"]]["json"])
    assert meta["similarity"] == pytest.approx(0.31) and meta["url"].endswith("a/b/two.png")
    assert meta["original_width"] == picture(2, 0).width


def test_image_folder_sidecar_order_and_mapping_file(image_folder, tmp_path):
    (image_folder / "captions.csv").write_text(
        "path,caption\na/one.jpg,from the mapping\nnocaption.jpg,mapped caption\ngone.jpg,no such file\n")
    source = SourceConfig.model_validate({
        "kind": "image_folder", "path": str(image_folder), "captions": {"sidecars": ["json", "txt"]},
        "image_folder": {"mapping": "captions.csv", "image_column": "path", "caption_column": "caption"}})
    store, totals = run_shards(source, tmp_path / "data")
    check_contract(store, totals)
    _, status, rejected = outputs(store)
    captions = {os.path.relpath(r["url"], image_folder): r["caption"] for r in status if r["status"] == "success"}
    assert captions["a/one.jpg"] == "from the mapping"  # the mapping comes first
    assert captions["nocaption.jpg"] == "mapped caption"
    assert captions["three.jpg"] == "from the json"  # json before txt, as configured
    assert totals["dropped"]["missing_caption"] == 1  # emptycaption.jpg only
    assert totals["dropped"]["missing_image"] == 2  # orphan.txt and gone.jpg
    assert "captions.csv" not in {os.path.basename(r["url"]) for r in rejected}


def test_image_folder_mapping_with_a_wrong_column_is_a_clear_error(image_folder, tmp_path):
    (image_folder / "metadata.csv").write_text("file_name,caption\na/one.jpg,x\n")
    source = SourceConfig.model_validate({"kind": "image_folder", "path": str(image_folder),
                                          "image_folder": {"mapping": "metadata.csv"}})
    with pytest.raises(intake.InputError, match=r"no column 'text' \(set source.image_folder.caption_column\)"):
        run_shards(source, tmp_path / "data")


def test_image_folder_on_fsspec_memory(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    for i in range(3):
        fs.pipe(f"/ingest-test/imgs/{i}.jpg", jpg(i))
        fs.pipe(f"/ingest-test/imgs/{i}.txt", caption(i).encode())
    try:
        source = SourceConfig(kind="image_folder", path="memory://ingest-test/imgs")
        store, totals = run_shards(source, "memory://ingest-test/data")
        assert totals == {"rows_in": 3, "downloaded": 3, "dropped": {}}
        samples, status, _ = outputs(store)
        urls = sorted(r["url"] for r in status)
        assert all(u.startswith("memory://") and u.endswith(f"ingest-test/imgs/{i}.jpg") for i, u in enumerate(urls))
        assert fsspec.open(urls[0], "rb").open().read() == jpg(0)  # a lineage URL opens
    finally:
        fs.rm("/ingest-test", recursive=True)


def test_many_threads_leave_stdout_and_stderr_alone(tmp_path):
    """img2dataset's resizer swaps file descriptors 1 and 2 around OpenCV; called from several
    threads at once it can leave them on /dev/null for good. Images are resized in one thread."""
    folder = tmp_path / "many"
    folder.mkdir()
    small = encode(draw(picture(0, 0)).resize((96, 96)), "JPEG")
    for i in range(200):
        (folder / f"{i}.jpg").write_bytes(small)
        (folder / f"{i}.txt").write_text("a picture")
    before = [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)]
    _, totals = run_shards(SourceConfig(kind="image_folder", path=str(folder)), tmp_path / "data",
                           shard_size=200, thread_count=16, min_image_size=64)
    assert totals["downloaded"] == 200
    assert [(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in (1, 2)] == before


def test_source_options_of_another_kind_are_refused():
    with pytest.raises(ValueError, match="source.hf_parquet is set but source.kind is 'image_folder'"):
        SourceConfig.model_validate({"kind": "image_folder", "path": "x", "hf_parquet": {"image_column": "img"}})
    with pytest.raises(ValueError, match="kind"):
        SourceConfig.model_validate({"kind": "folder", "path": "x"})


# img2dataset / WebDataset tars -----------------------------------------------------------------
class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def img2dataset_tars(tmp_path):
    """Tars written by img2dataset itself, from images served on loopback."""
    import img2dataset.downloader as i2d
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    www = tmp_path / "www"
    www.mkdir()
    for i in range(7):
        (www / f"{i}.jpg").write_bytes(jpg(i))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "i2d"
    out.mkdir()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        for shard, ids in enumerate([(0, 1, 2, 3), (4, 5, 6, 99)]):  # 99: a 404, not in the tar
            rows = {"url": [f"{base}/{i}.jpg" for i in ids], "caption": [caption(i) for i in ids],
                    "similarity": [0.3 + i / 100 for i in ids]}
            feather = str(tmp_path / f"in{shard}.feather")
            table = pa.table(rows)
            with pa.OSFile(feather, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            i2d.Downloader(
                sample_writer_class=WebDatasetSampleWriter,
                resizer=Resizer(image_size=256, resize_mode="no", resize_only_if_bigger=True),
                thread_count=2, save_caption=True, extract_exif=False, output_folder=str(out),
                column_list=["url", "caption", "similarity"], timeout=5, number_sample_per_shard=10,
                oom_shard_count=5, compute_hash="sha256", verify_hash_type=None, encode_format="jpg",
                retries=0, user_agent_token=None, disallowed_header_directives=None,
            ).download_shard((shard, feather))
    finally:
        server.shutdown()
    return out


def add_bad_members(tar_path) -> None:
    """Append samples an existing WebDataset may hold: no caption, bytes that are no image, no image."""
    with tarfile.open(tar_path, "a") as tar:
        for name, data in (("x1.jpg", jpg(1)), ("x2.jpg", b"\xff\xd8 not a jpeg"), ("x2.txt", b"broken"),
                           ("x3.txt", b"caption alone")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_reads_img2dataset_tars(img2dataset_tars, tmp_path):
    add_bad_members(img2dataset_tars / "00001.tar")
    source = SourceConfig(kind="webdataset", path=str(img2dataset_tars))
    store, totals = run_shards(source, tmp_path / "data", shard_size=10)
    assert store.done_shards("download") == ["00000", "00001"]
    assert totals["downloaded"] == 7
    assert totals["dropped"] == {"missing_caption": 1, "not_an_image": 1, "missing_image": 1}
    check_contract(store, totals)
    samples, status, _ = outputs(store)
    ok = [r for r in status if r["status"] == "success"]
    # The original URL and a carried column come from img2dataset's json.
    assert sorted(r["url"].rsplit("/", 1)[1] for r in ok) == [f"{i}.jpg" for i in range(7)]
    assert {r["caption"] for r in ok} == {caption(i) for i in range(7)}
    assert all(r["similarity"] == pytest.approx(0.3 + int(r["url"].rsplit("/", 1)[1][0]) / 100) for r in ok)
    bad = {r["url"].rsplit("#", 1)[1]: r for r in status if r["status"] != "success"}
    assert set(bad) == {"x1", "x2", "x3"}


def test_webdataset_tar_larger_than_a_shard_is_a_clear_error(tmp_path):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "big.tar")) as tar:
        for i in range(11):
            tar.write({"__key__": f"s{i:03d}", "png": encode(draw(picture(i, 0)), "PNG"),
                       "json": json.dumps({"caption": caption(i)})})
    source = SourceConfig(kind="webdataset", path=str(tmp_path / "big.tar"))
    with pytest.raises(intake.InputError, match=r"shard 00000 \(.*big.tar\) holds more than 10 .*set download.shard_size"):
        run_shards(source, tmp_path / "data", shard_size=10)  # keys of one digit: at most 10 samples
    store, totals = run_shards(source, tmp_path / "data2", shard_size=11)
    assert totals == {"rows_in": 11, "downloaded": 11, "dropped": {}}
    samples, _, _ = outputs(store)
    assert sorted(samples) == [f"00000{i:02d}" for i in range(11)]


# Hugging Face parquet -----------------------------------------------------------------------
def hf_parquet_folder(tmp_path):
    """Two files as datasets writes them: a struct image column in row groups of 3, and a binary one."""
    src = tmp_path / "hf"
    src.mkdir()
    images = [{"bytes": jpg(i), "path": f"{i}.jpg"} for i in range(5)]
    images.append({"bytes": b"\x89PNG broken", "path": "broken.png"})
    images.append({"bytes": None, "path": "only/a/path.jpg"})
    texts = [caption(i) for i in range(5)] + ["broken", "no bytes"]
    texts[3] = None
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array(images, struct), "text": texts, "punsafe": [0.1] * 7}),
                   src / "train-00000-of-00002.parquet", row_group_size=3)
    pq.write_table(pa.table({"image": pa.array([jpg(10), jpg(11)], pa.binary()), "text": [caption(10), caption(11)]}),
                   src / "train-00001-of-00002.parquet")
    return src


def test_hf_parquet_struct_and_binary_image_columns(tmp_path):
    source = SourceConfig(kind="hf_parquet", path=str(hf_parquet_folder(tmp_path)))
    store, totals = run_shards(source, tmp_path / "data", shard_size=4)
    assert store.done_shards("download") == ["00000", "00001", "00002"]  # 9 rows in shards of 4
    assert totals == {"rows_in": 9, "downloaded": 6,
                      "dropped": {"missing_caption": 1, "not_an_image": 1, "missing_image": 1}}
    check_contract(store, totals)
    _, status, _ = outputs(store)
    assert [r["row_index"] for r in status] == list(range(9))
    assert status[0]["punsafe"] == pytest.approx(0.1) and status[0]["url"].endswith("train-00000-of-00002.parquet#0")


def test_hf_parquet_without_image_bytes_is_a_clear_error(tmp_path):
    pq.write_table(pa.table({"image": ["a.jpg"], "text": ["x"]}), tmp_path / "paths.parquet")
    source = SourceConfig(kind="hf_parquet", path=str(tmp_path / "paths.parquet"))
    with pytest.raises(intake.InputError, match="hf_parquet needs image bytes"):
        run_shards(source, tmp_path / "data")
    source = SourceConfig.model_validate({"kind": "hf_parquet", "path": str(tmp_path / "paths.parquet"),
                                          "hf_parquet": {"caption_column": "caption"}})
    with pytest.raises(intake.InputError, match="no column 'caption'"):
        run_shards(source, tmp_path / "data2")


def test_prepared_store_refuses_another_kind(image_folder, tmp_path):
    run_shards(SourceConfig(kind="image_folder", path=str(image_folder)), tmp_path / "data")
    with pytest.raises(intake.InputError, match="prepared from a image_folder source"):
        run_shards(SourceConfig(kind="hf_parquet", path=str(image_folder)), tmp_path / "data")


# Through every later stage ---------------------------------------------------------------------
@pytest.fixture
def hf_parquet(tmp_path):
    return hf_parquet_folder(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind,fixture,good", [("image_folder", "image_folder", 4),
                                               ("webdataset", "img2dataset_tars", 7),
                                               ("hf_parquet", "hf_parquet", 6)])
def test_each_kind_reaches_token_shards_and_a_training_step(kind, fixture, good, request, tmp_path, ray_local,
                                                           one_thread):
    import math

    from tessera.config import RunConfig
    from tessera.pipelines import score, select, tokenize, train

    cfg = RunConfig.model_validate({
        "name": "own", "data_root": str(tmp_path / "data"), "runs_root": str(tmp_path / "runs"),
        "models_root": str(tmp_path / "models"), "ray": {"num_cpus": 2},
        "source": {"kind": kind, "path": str(request.getfixturevalue(fixture))},
        "download": {**CFG, "shard_size": 10, "max_tasks_in_flight": 2, "shard_retries": 0},
        "filters": {"batch_size": 8, "precision": "fp32", "clip_score": {"source": "off"},
                    "aesthetic": {"source": "off"}, "watermark": {"source": "off"}, "nsfw": {"source": "off"},
                    "dedup": {"enabled": False}, "size": {"min_side": 256}},
        "caption": {"enabled": False},
        "tokenize": {"vq": "tiny:vq", "resolutions": [256], "text_encoder": "tiny:t5", "text_max_length": 16,
                     "batch_size": 8},
        "stage1": {"model": "GPT-nano", "vocab_size": 512, "global_batch": 2, "max_steps": 1, "use_ray": False,
                   "text_encoder": "tiny:t5", "checkpoint_every": 1, "log_every": 1}})
    store = ShardStore(cfg.data_root)
    downloaded = sources.run(cfg.source, cfg.download, cfg.ray, store)  # through Ray, as the flow runs it
    assert downloaded.downloaded == good
    assert downloaded.downloaded + sum(downloaded.dropped.values()) == downloaded.rows_in
    assert score.run(cfg.filters, cfg.ray, store, cfg.models_root).samples == good
    kept = select.run(cfg.filters, store).kept
    assert kept == good  # every filter that could drop one of these pictures is off or passes it
    tokens = tokenize.run(cfg.tokenize, cfg.ray, store, cfg.models_root).per_resolution[256]
    assert tokens["tokenized"] == kept
    result = train.run(cfg, "stage1")
    assert result.step == 1 and math.isfinite(result.last_loss)
