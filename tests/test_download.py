"""The download stage end to end on the synthetic set: every bad kind, the counts, the images."""
import io
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tessera.config.ray import RayConfig
from tessera.pipelines import download, intake, prepare
from tessera.demo.synthetic import SERVED_ODD, SyntheticServer, expected_outcomes

from .download_helpers import outcomes, run_download, sample_meta, tar_samples, url_path, write_source

NUM_IMAGES = 12


@pytest.fixture(scope="module")
def server():
    with SyntheticServer(seed=0) as s:
        yield s


@pytest.fixture(scope="module")
def downloaded(server, ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("download")
    source = write_source(str(root / "source.parquet"), server, NUM_IMAGES)
    result, store = run_download(source, str(root / "data"))
    return source, result, store


def test_every_bad_record_ends_with_its_reason(downloaded, server):
    _, _, store = downloaded
    by_path = {}
    for url, outcome in outcomes(store).values():
        by_path.setdefault(url_path(url, server.base), []).append(outcome)
    for where, reason in expected_outcomes().items():
        assert by_path[where] == [reason], where
    for path in SERVED_ODD:
        assert by_path[path] == ["downloaded"], path
    # The duplicated URL downloads once and is dropped once.
    assert sorted(by_path["/img/0.jpg"]) == ["downloaded", "duplicate_url"]


def test_counts_add_up(downloaded):
    source, result, store = downloaded
    rows_in = pq.read_metadata(source.path).num_rows
    per_row = outcomes(store)
    assert sorted(per_row) == list(range(rows_in)), "every input row ends in exactly one place"
    assert result.rows_in == rows_in
    assert result.downloaded + sum(result.dropped.values()) == rows_in
    counted = {}
    for _, outcome in per_row.values():
        counted[outcome] = counted.get(outcome, 0) + 1
    assert counted.pop("downloaded") == result.downloaded
    assert counted == result.dropped
    funnel = result.funnel()
    assert sum(r["count"] for r in funnel) == rows_in
    assert len(tar_samples(store)) == result.downloaded


def test_images_come_out_as_upright_rgb(downloaded):
    _, _, store = downloaded
    samples = tar_samples(store)
    meta = sample_meta(samples)
    for key, files in samples.items():
        img = Image.open(io.BytesIO(files["jpg"]))
        assert img.mode == "RGB", (meta[key]["url"], img.mode)
        assert min(img.size) <= 512
    rotated = next(k for k, m in meta.items() if m["url"].endswith("/odd/exif-rotated.jpg"))
    width, height = Image.open(io.BytesIO(samples[rotated]["jpg"])).size
    assert height > width, "the EXIF orientation was applied"
    assert (meta[rotated]["original_width"], meta[rotated]["original_height"]) == (520, 640)


def test_caption_trouble_does_not_stop_a_download(downloaded):
    _, result, store = downloaded
    captions = [files["txt"].decode() for files in tar_samples(store).values()]
    limit = download.DownloadConfig().caption_limits.max_bytes
    assert "" in captions
    # A 6000-byte caption is cut to the limit at a character boundary, and counted.
    assert any(c.startswith("a very long caption") and len(c.encode()) <= limit < 6000 for c in captions)
    assert all(len(c.encode()) <= limit for c in captions)
    assert any("\ufffd" in c for c in captions), "a non-UTF-8 caption is repaired, not fatal"
    assert result.repaired == {"caption_cut": 1, "caption_encoding": 1}


def test_rerun_skips_done_shards(downloaded, ray_local):
    source, result, store = downloaded
    markers = {n: os.path.getmtime(store.path("download", n)) for n in store.list("download", ".done")}
    again, _ = run_download(source, store.root)
    assert again == result
    assert {n: os.path.getmtime(store.path("download", n)) for n in markers} == markers


def test_missing_url_column_is_a_clear_error(tmp_path, server):
    source = write_source(str(tmp_path / "in.parquet"), server, 2)
    source = source.model_copy(update={"columns": source.columns.model_copy(update={"url": "url_link"})})
    from tessera.core.store import ShardStore

    with pytest.raises(intake.InputError, match="no column 'url_link'.*source.columns.url"):
        download.prepare(source, download.DownloadConfig(), ShardStore(str(tmp_path / "data")), RayConfig())


@pytest.mark.parametrize("message, reason", [
    ("HTTP Error 404: Not Found", "http_404"),
    ("HTTP Error 503: Service Unavailable", "http_503"),
    ("HTTP Error 302: The HTTP server returned a redirect error that would lead to an infinite loop.\n"
     "The last 30x error message was:\nFound", "redirect_loop"),
    ("HTTP Error 302: Found - Redirection to url 'file:///etc/passwd' is not allowed", "bad_scheme"),
    ("<urlopen error timed out>", "timeout"),
    ("The read operation timed out", "timeout"),
    ("<urlopen error blocked_metadata: redirect to http://x>", "blocked_metadata"),
    ("blocked_private: evil.test resolves to 10.1.2.3", "blocked_private"),
    ("bad_scheme: redirect to ftp://x/a.jpg", "bad_scheme"),
    ("url_too_long: redirect to http://x/aaaa", "url_too_long"),
    ("timed out: the download took longer than its deadline of 3 s", "timeout"),
    ("HTTP Error 404: see http://x/blocked_private: y", "http_404"),
    ("<urlopen error [Errno 111] Connection refused>", "connection_error"),
    ("<urlopen error [Errno -2] Name or service not known>", "dns_error"),
    ("Use of image disallowed by X-Robots-Tag directive", "disallowed_by_site"),
    ("something nobody expected", "download_error"),
    (None, "download_error"),
])
def test_reason_for(message, reason):
    assert intake.reason_for(message) == reason


KILL_SCRIPT = """
import sys
from tessera.config.ray import RayConfig
from tessera.config.ray import RayConfig
from tessera.pipelines import download, prepare
from tessera.core.store import ShardStore
from tests.download_helpers import download_config
from tessera.config.download import SourceConfig
source = SourceConfig(path=sys.argv[1], columns={"url": "URL", "caption": "TEXT"})
download.run(source, download_config(max_tasks_in_flight=1), RayConfig(num_cpus=1), ShardStore(sys.argv[2]))
"""


@pytest.mark.slow
def test_killed_download_resumes_to_the_same_result(server, ray_local, tmp_path):
    source = write_source(str(tmp_path / "source.parquet"), server, 40)
    root = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, source.path, str(root)],
                            cwd=os.path.dirname(os.path.dirname(__file__)), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # a busy machine takes long to start Ray and cut the input
    while time.time() < deadline and not list((root / "download").glob("*.done")) and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in (root / "download").glob("*.done"))
    total = len(list((root / "download" / "_input").glob("*.parquet")))
    assert 1 <= len(done_before) < total, "the kill must land mid-way"

    resumed, store = run_download(source, str(root))
    straight, reference = run_download(source, str(tmp_path / "straight"))
    assert resumed == straight
    assert sorted(p.name for p in (root / "download").glob("*.tmp-*")) == []
    assert outcomes(store) == outcomes(reference)
    assert {k: v["jpg"] for k, v in tar_samples(store).items()} == \
        {k: v["jpg"] for k, v in tar_samples(reference).items()}


def test_inputs_with_differing_types_and_duplicates_across_files(tmp_path, ray_local):
    import pyarrow as pa

    from tessera.config.download import DownloadConfig, SourceConfig
    from tessera.core.store import ShardStore

    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"URL": ["http://127.0.0.1:1/a", "http://127.0.0.1:1/b"], "TEXT": ["a", "b"],
                                     "WIDTH": pa.array([640, 480], pa.int64())}), folder / "part-0.parquet")
    pq.write_table(pa.table({"URL": ["http://127.0.0.1:1/a", None], "TEXT": ["a again", "none"],
                                     "WIDTH": pa.array([640.0, 1.5], pa.float64())}), folder / "part-1.parquet")
    store = ShardStore(str(tmp_path / "data"))
    shards = download.prepare(SourceConfig(path=str(folder)), DownloadConfig(shard_size=3), store, RayConfig())
    assert shards == ["00000", "00001"]
    rows = [r for s in shards for r in store.read_table("download/_input", f"{s}.parquet").to_pylist()]
    assert [r["row_index"] for r in rows] == [0, 1, 2, 3]
    assert prepare.duplicate_rows(store, 0, 3) == {2}  # the repeated URL; the empty one is no duplicate
    assert [r["WIDTH"] for r in rows] == [640.0, 480.0, 640.0, 1.5]
