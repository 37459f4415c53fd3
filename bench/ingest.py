"""Image-folder ingest throughput: Tessera's ingest against plain img2dataset over file:// URLs.

Without an image-folder input, the way to turn local images into img2dataset shards is to list
them in a parquet of file:// URLs and run img2dataset on it. Both sides here read the same
folder of JPEGs with .txt captions, with the same resize, size and thread settings, in one
process each (no Ray: the per-shard work itself is what is compared).

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
    from tessera.pipelines.synthetic import draw, encode, picture

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
    from tessera.pipelines.store import ShardStore

    source = SourceConfig(kind="image_folder", path=folder)
    store = ShardStore(out)
    start = time.perf_counter()
    done = 0
    for shard in ingest.prepare(source, cfg, store):
        done += ingest.ingest_shard(store, shard, source=source, cfg=cfg)["downloaded"]
    return time.perf_counter() - start, done


def plain_img2dataset(folder: str, out: str, work: str, cfg) -> tuple[float, int]:
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from img2dataset import download

    start = time.perf_counter()
    names = sorted(n for n in os.listdir(folder) if n.endswith(".jpg"))
    captions = [open(os.path.join(folder, n[:-4] + ".txt")).read() for n in names]
    source = os.path.join(work, "files.parquet")
    pq.write_table(pa.table({"URL": [f"file://{os.path.join(folder, n)}" for n in names], "TEXT": captions}), source)
    download(
        url_list=source, input_format="parquet", url_col="URL", caption_col="TEXT",
        output_format="webdataset", output_folder=out, processes_count=1, distributor="multiprocessing",
        thread_count=cfg.thread_count, number_sample_per_shard=cfg.shard_size, image_size=cfg.image_size,
        resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_quality=cfg.encode_quality, min_image_size=cfg.min_image_size,
        max_aspect_ratio=cfg.max_aspect_ratio, max_image_area=cfg.max_image_area, compute_hash="sha256",
        enable_wandb=False,
    )
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
    work = tempfile.mkdtemp(prefix="tessera-bench-ingest-")
    try:
        folder = os.path.join(work, "images")
        make_folder(folder, args.images)
        ours, ours_n = tessera_ingest(folder, os.path.join(work, "ours"), cfg)
        base, base_n = plain_img2dataset(folder, os.path.join(work, "plain"), work, cfg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.images} images, shards of {args.shard_size}, {args.threads} threads, one process each")
    print(f"  tessera ingest (image_folder): {ours_n} samples in {ours:.1f} s = {ours_n / ours:.0f} img/s")
    print(f"  plain img2dataset (file://):  {base_n} samples in {base:.1f} s = {base_n / base:.0f} img/s")
    print(f"  ratio (tessera / img2dataset): {(ours_n / ours) / (base_n / base):.2f}x")


if __name__ == "__main__":
    main()
