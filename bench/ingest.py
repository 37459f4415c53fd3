"""Image-folder ingest throughput: Tessera's ingest against plain img2dataset over file:// URLs.

Without an image-folder input, the way to turn local images into img2dataset shards is to list
them as file:// URLs and run img2dataset on them. Both sides here read the same folder of JPEGs
with .txt captions, through the same safe resizer with the same settings, in this one process with
every import done first (no Ray, no process start: the per-shard work itself is compared).

    python -m bench.ingest [--images 600] [--shard-size 200] [--threads 8]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def make_folder(root: str, n: int) -> None:
    from tessera.demo.synthetic import draw, encode, picture

    os.makedirs(root)
    for i in range(n):
        p = picture(i, 0)
        with open(os.path.join(root, f"{i:06d}.jpg"), "wb") as f:
            f.write(encode(draw(p), "JPEG", quality=90))
        with open(os.path.join(root, f"{i:06d}.txt"), "w") as f:
            f.write(p.caption)


def tessera_ingest(folder: str, out: str, cfg) -> tuple[float, int]:
    from tessera.config.download import SourceConfig
    from tessera.pipelines import ingest
    from tessera.core.store import ShardStore

    source = SourceConfig(kind="image_folder", path=folder)
    store = ShardStore(out)
    start = time.perf_counter()
    done = 0
    for shard in ingest.prepare(source, cfg, store):
        done += ingest.ingest_shard(store, shard, source=source, cfg=cfg)["downloaded"]
    return time.perf_counter() - start, done


def plain_img2dataset(folder: str, out: str, work: str, cfg) -> tuple[float, int]:
    """img2dataset's own per-shard downloader and writer over file:// URLs, in this process."""
    import json

    import pyarrow as pa
    from img2dataset.downloader import Downloader
    from img2dataset.writer import WebDatasetSampleWriter

    from tessera.pipelines.imagecheck import resizer_for

    start = time.perf_counter()
    names = sorted(n for n in os.listdir(folder) if n.endswith(".jpg"))
    os.makedirs(out)
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=resizer_for(cfg),
        thread_count=cfg.thread_count, save_caption=True, extract_exif=False, output_folder=out,
        column_list=["url", "caption"], timeout=10, number_sample_per_shard=cfg.shard_size, oom_shard_count=5,
        compute_hash="sha256", verify_hash_type=None, encode_format="jpg", retries=0,
        user_agent_token=None, disallowed_header_directives=None,
    )
    for shard, first in enumerate(range(0, len(names), cfg.shard_size)):
        part = names[first:first + cfg.shard_size]
        table = pa.table({"url": [f"file://{os.path.join(folder, n)}" for n in part],
                          "caption": [open(os.path.join(folder, n[:-4] + ".txt")).read() for n in part]})
        feather = os.path.join(work, f"{shard}.feather")
        with pa.OSFile(feather, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        downloader.download_shard((shard, feather))
    seconds = time.perf_counter() - start
    done = sum(json.load(open(os.path.join(out, n)))["successes"] for n in os.listdir(out) if n.endswith("_stats.json"))
    return seconds, done


def main() -> None:
    from tessera.config.download import DownloadConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--shard-size", type=int, default=200)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    cfg = DownloadConfig(shard_size=args.shard_size, thread_count=args.threads, image_size=256)
    import img2dataset.downloader  # noqa: F401 - imports (torch, albumentations) are not timed
    import webdataset  # noqa: F401

    from tessera.pipelines import imagecheck  # noqa: F401

    work = tempfile.mkdtemp(prefix="tessera-bench-ingest-")
    try:
        folder = os.path.join(work, "images")
        make_folder(folder, args.images)
        ours, ours_n = tessera_ingest(folder, os.path.join(work, "ours"), cfg)
        base, base_n = plain_img2dataset(folder, os.path.join(work, "plain"), work, cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.images} images, shards of {args.shard_size}, {args.threads} threads, one process, imports warm")
    print(f"  tessera ingest (image_folder):    {ours_n} samples in {ours:.1f} s = {ours_n / ours:.0f} img/s")
    print(f"  img2dataset Downloader (file://): {base_n} samples in {base:.1f} s = {base_n / base:.0f} img/s")
    print(f"  ratio (tessera / img2dataset): {(ours_n / ours) / (base_n / base):.2f}x")


if __name__ == "__main__":
    main()
