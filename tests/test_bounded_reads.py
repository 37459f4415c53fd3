"""Untrusted input is read within bounds: a huge response body, a sparse tar member, a single
row group, a huge caption. Each bad row is dropped with its own reason, the shard finishes, and
the process's peak memory (ru_maxrss of a fresh subprocess doing the work) stays under a bound."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tessera.config.download import CaptionLimits, DownloadConfig, SourceConfig
from tessera.core.store import ShardStore
from tessera.core.tars import TarProblem, tar_members
from tessera.demo.synthetic import draw, encode, picture
from tessera.pipelines import ingest, intake

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
CAP = 8 * MiB


def jpg(i: int) -> bytes:
    return encode(draw(picture(i, 0)), "JPEG", quality=90)


def peak_growth(code: str, *args: str) -> dict:
    """Run `code` in a fresh Python after the imports it needs; returns what it leaves in `result`
    (a dict) with `grown_mib`: how far the process's resident memory rose above where it started,
    at its peak. The kernel's peak (VmHWM) is reset after the imports, whose own peak is higher
    than what the work needs."""
    script = (
        "import json, re, sys\n"
        "import tessera.pipelines.download, tessera.pipelines.ingest\n"
        "def kib(field): return int(re.search(field + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = kib('VmRSS')\n"
        f"{code}\n"
        "print(json.dumps({**result, 'grown_mib': (kib('VmHWM') - before) / 1024}))\n")
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1",
                                            "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"peak resident memory grew {result['grown_mib']:.1f} MiB")
    return result


# A response body over the cap ------------------------------------------------------------------
class Endless(BaseHTTPRequestHandler):
    """Serves 3 GiB of zeros for as long as the client reads, with a true, a false or no length."""

    protocol_version = "HTTP/1.1"
    BODY = 3 * GiB

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/ok.jpg":
            data = jpg(1)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        chunked = self.path == "/chunked"
        if self.path == "/declared":
            self.send_header("Content-Length", str(self.BODY))
        elif self.path == "/lying":  # says less than it sends: the client reads what it says
            self.send_header("Content-Length", "1000")
        elif chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:  # no length: the body ends when the connection closes
            self.send_header("Connection", "close")
        self.end_headers()
        block = b"\0" * MiB
        try:
            for _ in range(self.BODY // MiB):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
        except OSError:  # the client stopped reading
            pass
        self.close_connection = True


@pytest.fixture
def endless():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


DOWNLOAD_SHARD = """
from tessera.config.download import DownloadConfig
from tessera.core.store import ShardStore
from tessera.pipelines import download
cfg = DownloadConfig.model_validate_json(sys.argv[2])
result = download.download_shard(ShardStore(sys.argv[1]), "00000", cfg, [])
"""


def test_response_bodies_over_the_cap_are_dropped_as_too_large(endless, tmp_path):
    paths = ["/ok.jpg", "/declared", "/unsized", "/chunked", "/lying"]
    store = ShardStore(str(tmp_path / "data"))
    store.write_table(pa.table({"url": [endless + p for p in paths],
                                "caption_bytes": pa.array([b"a picture"] * len(paths), pa.binary()),
                                "row_index": pa.array(range(len(paths)), pa.int64())}),
                      "download/_input", "00000.parquet")
    # A deadline far beyond what reading up to the cap takes, so that only the cap can stop a read.
    cfg = DownloadConfig(shard_size=10, thread_count=5, timeout=120, min_image_size=16, max_image_bytes=CAP,
                         urls={"allow_loopback": True})
    info = peak_growth(DOWNLOAD_SHARD, store.root, cfg.model_dump_json())
    status = pq.read_table(store.path("download", "00000.parquet")).to_pylist()
    reasons = {r["url"].rsplit("/", 1)[1]: intake.reason_for(r["error_message"]) if r["status"] != "success"
               else "downloaded" for r in status}
    assert reasons["ok.jpg"] == "downloaded"
    assert reasons["declared"] == "too_large"  # refused by its Content-Length, before any read
    assert reasons["unsized"] == "too_large" and reasons["chunked"] == "too_large"  # cut off at the cap
    assert reasons["lying"] == "not_an_image"  # 1000 bytes read, as the header said
    assert info["downloaded"] == 1 and info["dropped"] == {"too_large": 3, "not_an_image": 1}
    # Five threads, each holding at most the cap (and a copy while it is joined), not 3 GiB.
    assert info["grown_mib"] < 5 * 2 * CAP / MiB + 40, info


# Tars ------------------------------------------------------------------------------------------
def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def sparse_member(name: str, real_size: int) -> bytes:
    """A GNU sparse member (old GNU format) of `real_size` bytes stored as one 512-byte block of
    data: the header and its data, as GNU tar writes them."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 512
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[386:398] = b"%011o\0" % (real_size - 512)  # one stretch of data at the end of the file
    header[398:410] = b"%011o\0" % 512
    header[483:495] = b"%011o\0" % real_size  # the size once expanded
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + b"\xff" * 512


def webdataset_tar(path: Path, samples: int, extra: bytes = b"") -> bytes:
    """`samples` good samples (s000..), then `extra` raw member bytes; returns the whole tar."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(samples):
            add(tar, f"s{i:03d}.jpg", jpg(i))
            add(tar, f"s{i:03d}.txt", picture(i, 0).caption.encode())
        tar.fileobj.write(extra)
        tar.offset += len(extra)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


# The counts; what a marker also carries (the lineage: fingerprint, tar_bytes; the parquet's columns
# for score) is tested with the store and with score.
MARKER_ONLY = ("fingerprint", "tar_bytes", "columns")
INGEST_SHARDS = f"""
MARKER_ONLY = {MARKER_ONLY!r}
from tessera.config.download import DownloadConfig, SourceConfig
from tessera.core.store import ShardStore
from tessera.pipelines import ingest
source = SourceConfig.model_validate_json(sys.argv[2])
cfg = DownloadConfig.model_validate_json(sys.argv[3])
store = ShardStore(sys.argv[1])
infos = [{{k: v for k, v in ingest.ingest_shard(store, s, source=source, cfg=cfg).items()
          if k not in MARKER_ONLY}} for s in sys.argv[4].split(",")]
result = {{"infos": infos}}
"""


def ingest_in_subprocess(store: ShardStore, source: SourceConfig, cfg: DownloadConfig, shards: list[str]) -> dict:
    return peak_growth(INGEST_SHARDS, store.root, source.model_dump_json(exclude_unset=True), cfg.model_dump_json(), ",".join(shards))


def test_a_sparse_member_is_refused_without_being_expanded(tmp_path):
    webdataset_tar(tmp_path / "sparse.tar", 3, sparse_member("s003.jpg", 4 * GiB) + tar_member("s003.txt", b"big"))
    assert (tmp_path / "sparse.tar").stat().st_size < 100_000
    source = SourceConfig(kind="webdataset", path=str(tmp_path / "sparse.tar"))
    cfg = DownloadConfig(shard_size=10, thread_count=2, min_image_size=16, max_image_bytes=CAP)
    store = ShardStore(str(tmp_path / "data"))
    shards = ingest.prepare(source, cfg, store)
    assert store.read_json("download/_input", "_prepared.json")["rows_per_shard"] == {"00000": 4}
    info = ingest_in_subprocess(store, source, cfg, shards)
    assert info["infos"] == [{"rows_in": 4, "downloaded": 3, "dropped": {"sparse_member": 1}, "repaired": {}}]
    assert info["grown_mib"] < 60, info


def tar_member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(format=tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % 512)


def test_a_member_over_the_cap_drops_its_sample(tmp_path):
    webdataset_tar(tmp_path / "big.tar", 2, tar_member("s002.jpg", b"\0" * (CAP + 1)) + tar_member("s002.txt", b"x"))
    source = SourceConfig(kind="webdataset", path=str(tmp_path / "big.tar"))
    cfg = DownloadConfig(shard_size=10, thread_count=2, min_image_size=16, max_image_bytes=CAP)
    store = ShardStore(str(tmp_path / "data"))
    (shard,) = ingest.prepare(source, cfg, store)
    info = ingest.ingest_shard(store, shard, source=source, cfg=cfg)
    counts = {k: v for k, v in info.items() if k not in MARKER_ONLY}
    assert counts == {"rows_in": 3, "downloaded": 2, "dropped": {"too_large": 1}, "repaired": {}}


def test_the_tar_reader_refuses_sparse_and_oversized_members_and_names_the_cut():
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w", format=tarfile.GNU_FORMAT) as tar:
        add(tar, "a.txt", b"small")
        add(tar, "b.bin", b"\1" * 2000)
    whole = data.getvalue()
    members = list(tar_members(io.BytesIO(whole), "t.tar", 1000))
    assert [(m.name, m.data, m.refused) for m in members] == [("a.txt", b"small", None), ("b.bin", None, "too_large")]
    # Cut inside b.bin's data: a.txt comes out, then the cut, naming the file.
    cut = tar_members(io.BytesIO(whole[:512 * 3 + 100]), "t.tar", 10_000)
    assert next(cut).data == b"small"
    with pytest.raises(TarProblem, match=r"^truncated_tar: t.tar: "):
        next(cut)
    # Cut inside a header, and at a member boundary without the end marker: neither ends silently.
    for end in (512 * 2 + 100, 512 * 2):
        with pytest.raises(TarProblem, match="truncated_tar"):
            list(tar_members(io.BytesIO(whole[:end]), "t.tar", 10_000))
    with pytest.raises(TarProblem, match=r"^corrupt_tar: t.tar"):
        list(tar_members(io.BytesIO(b"this is no tar" * 100), "t.tar", 10_000))


def test_a_truncated_tar_keeps_the_samples_before_the_cut(tmp_path):
    whole = webdataset_tar(tmp_path / "a.tar", 10)
    # Cut inside the image of the eighth sample (s007): seven samples are complete before it.
    offset = next(m.offset_data for m in tarfile.open(fileobj=io.BytesIO(whole)) if m.name == "s007.jpg")
    (tmp_path / "a.tar").write_bytes(whole[:offset + 100])
    webdataset_tar(tmp_path / "b.tar", 2)
    source = SourceConfig(kind="webdataset", path=str(tmp_path))
    cfg = DownloadConfig(shard_size=10, thread_count=2, min_image_size=16)
    store = ShardStore(str(tmp_path / "data"))
    shards = ingest.prepare(source, cfg, store)
    # The listing counts samples, the cut one included, so a failed shard is counted in samples.
    rows_per_shard = store.read_json("download/_input", "_prepared.json")["rows_per_shard"]
    assert rows_per_shard == {"00000": 8, "00001": 2}
    for shard in shards:
        store.mark_done("download", shard, ingest.ingest_shard(store, shard, source=source, cfg=cfg))
    result = intake.summarize(store, shards, {}, rows_per_shard)
    assert result.downloaded == 9 and result.dropped == {"truncated_tar": 1} and result.rows_in == 10
    status = pq.read_table(store.path("download", "00000.parquet")).to_pylist()
    assert [r["status"] for r in status] == ["success"] * 7 + ["failed_to_download"]
    assert status[-1]["error_message"].startswith(f"truncated_tar: {tmp_path / 'a.tar'}: ")
    # A failed shard counts its samples, not one row per tar.
    failed = intake.summarize(store, shards, {"00000": "boom"}, rows_per_shard)
    assert failed.failed_rows == 8 and failed.rows_in == 10


# Parquet and image folders ---------------------------------------------------------------------
@pytest.mark.parametrize("pages", ["one per row", "one per row group"])
def test_a_single_row_group_is_read_a_slice_at_a_time(pages, tmp_path):
    rows = 100
    blob = 2 * MiB  # zeros compress to nearly nothing on disk, but not in memory
    images = [jpg(i) if i % 10 == 0 else bytes([i]) + b"\0" * blob for i in range(rows)]
    # pyarrow ends a data page after a batch of writes (1024 rows unless told): by default this
    # whole row group, 200 MiB, is one page, which no reader can decode in part.
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "text": [f"row {i}" for i in range(rows)]}),
                   tmp_path / "one-group.parquet", row_group_size=rows, use_dictionary=False,
                   write_batch_size=1 if pages == "one per row" else 1024)
    assert pq.ParquetFile(tmp_path / "one-group.parquet").metadata.num_row_groups == 1
    source = SourceConfig.model_validate({"kind": "hf_parquet", "path": str(tmp_path / "one-group.parquet"),
                                          "hf_parquet": {"max_row_group_bytes": 64 * MiB}})
    cfg = DownloadConfig(shard_size=10, thread_count=2, min_image_size=16, max_image_bytes=MiB)
    store = ShardStore(str(tmp_path / "data"))
    shards = ingest.prepare(source, cfg, store)
    assert len(shards) == 10
    info = ingest_in_subprocess(store, source, cfg, ["00005"])
    if pages == "one per row":  # the row group is too large to hold, but not to read a row at a time
        source = source.model_copy(update={"hf_parquet": source.hf_parquet.model_copy(
            update={"max_row_group_bytes": GiB})})
        info = ingest_in_subprocess(store, source, cfg, ["00005"])
        expect = {"rows_in": 10, "downloaded": 1, "dropped": {"too_large": 9}, "repaired": {}}
    else:
        expect = {"rows_in": 10, "downloaded": 0, "dropped": {"row_group_too_large": 10}, "repaired": {}}
    assert info["infos"] == [expect]
    status = pq.read_table(store.path("download", "00005.parquet")).to_pylist()
    assert [r["row_index"] for r in status] == list(range(50, 60))
    # The row group holds 200 MiB once read; a shard holds a row or two of it at a time.
    assert info["grown_mib"] < 60, info


def test_an_image_file_over_the_cap_is_not_read(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(jpg(1))
    (folder / "ok.txt").write_text("fine")
    with open(folder / "huge.jpg", "wb") as f:
        f.truncate(3 * GiB)  # sparse on disk: it costs nothing unless someone reads it
    (folder / "huge.txt").write_text("huge")
    source = SourceConfig(kind="image_folder", path=str(folder))
    cfg = DownloadConfig(shard_size=10, thread_count=2, min_image_size=16, max_image_bytes=CAP)
    store = ShardStore(str(tmp_path / "data"))
    shards = ingest.prepare(source, cfg, store)
    info = ingest_in_subprocess(store, source, cfg, shards)
    assert info["infos"] == [{"rows_in": 2, "downloaded": 1, "dropped": {"too_large": 1}, "repaired": {}}]
    assert info["grown_mib"] < 60, info


def test_symlinked_folders_are_followed_once(tmp_path):
    folder, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    (elsewhere / "a.jpg").write_bytes(jpg(1))
    (elsewhere / "a.txt").write_text("linked in")
    (folder / "b.jpg").write_bytes(jpg(2))
    (folder / "b.txt").write_text("at home")
    (folder / "linked").symlink_to(elsewhere, target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)  # a way back in: not listed twice
    (elsewhere / "back").symlink_to(elsewhere, target_is_directory=True)
    source = SourceConfig(kind="image_folder", path=str(folder))
    rows = ingest.ImageFolder(source, DownloadConfig()).rows()
    assert sorted(Path(r["url"]).relative_to(folder).as_posix() for r in rows) == ["b.jpg", "linked/a.jpg"]
    assert all(r["reason"] is None for r in rows)


# Captions --------------------------------------------------------------------------------------
def test_a_ten_megabyte_caption_is_cut_or_dropped_before_it_goes_further(tmp_path):
    huge = ("a caption that never ends " * 400_000).encode()[:10 * 1000 * 1000]
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "huge.jpg").write_bytes(jpg(1))
    (folder / "huge.txt").write_bytes(huge)
    (folder / "latin.jpg").write_bytes(jpg(2))
    (folder / "latin.txt").write_bytes(b"caf\xe9 au lait")
    source = SourceConfig(kind="image_folder", path=str(folder))
    for limits, expect in (
            (CaptionLimits(), {"downloaded": 2, "dropped": {}, "repaired": {"caption_cut": 1, "caption_encoding": 1}}),
            (CaptionLimits(too_long="drop", bad_encoding="drop"),
             {"downloaded": 0, "dropped": {"caption_too_long": 1, "bad_caption_encoding": 1}, "repaired": {}})):
        cfg = DownloadConfig(shard_size=10, thread_count=2, min_image_size=16, caption_limits=limits)
        store = ShardStore(str(tmp_path / limits.too_long))
        shards = ingest.prepare(source, cfg, store)
        info = ingest_in_subprocess(store, source, cfg, shards)
        assert info["infos"] == [{"rows_in": 2, **expect}]
        assert info["grown_mib"] < 80, info
        status = {Path(r["url"]).name: r for r in pq.read_table(store.path("download", "00000.parquet")).to_pylist()}
        if limits.too_long == "cut":
            assert len(status["huge.jpg"]["caption"].encode()) <= limits.max_bytes
            assert status["latin.jpg"]["caption"] == "caf\ufffd au lait"
        else:
            assert status["huge.jpg"]["error_message"].startswith("caption_too_long: ")


@pytest.mark.parametrize("raw, expect", [
    ("é" * 3000, ("é" * 2048, None, ("caption_cut",))),  # 6000 bytes, cut at a character boundary
    (b"ok \xff", ("ok \ufffd", None, ("caption_encoding",))),
    ("  \n", (None, None, ())),
    (None, (None, None, ())),
])
def test_clean_caption(raw, expect):
    assert tuple(intake.clean_caption(raw, CaptionLimits())) == expect
