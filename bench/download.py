"""Download throughput: Tessera's download stage against plain img2dataset, same input, same run.

Both fetch the same synthetic set from the loopback server with the same resize, size and
thread settings on the same CPUs; the server's images are rendered before timing starts.
Starting the local Ray is timed on its own: on a cluster Ray is already up, so the main ratio
leaves it out, and a second ratio puts it back in.

    python -m bench.download [--images 4000] [--shard-size 250] [--cpus 2] [--threads 16]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def plain_img2dataset(source: str, out: str, args, cfg) -> float:
    from img2dataset import download

    start = time.perf_counter()
    download(
        url_list=source, input_format="parquet", url_col="URL", caption_col="TEXT",
        output_format="webdataset", output_folder=out, processes_count=args.cpus,
        thread_count=cfg.thread_count, number_sample_per_shard=cfg.shard_size,
        image_size=cfg.image_size, resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger, encode_quality=cfg.encode_quality,
        min_image_size=cfg.min_image_size, max_aspect_ratio=cfg.max_aspect_ratio,
        max_image_area=cfg.max_image_area, timeout=cfg.timeout, retries=cfg.retries,
        distributor="multiprocessing", compute_hash="sha256", enable_wandb=False,
        disallowed_header_directives=cfg.disallowed_header_directives,
    )
    return time.perf_counter() - start


def start_ray(args) -> float:
    from tessera.config.ray import RayConfig
    from tessera.core.raytools import init_ray

    start = time.perf_counter()
    init_ray(RayConfig(num_cpus=args.cpus))
    return time.perf_counter() - start


def tessera_download(source: str, out: str, args, cfg) -> float:
    from tessera.config.download import SourceConfig
    from tessera.config.ray import RayConfig
    from tessera.pipelines import download
    from tessera.core.store import ShardStore

    start = time.perf_counter()
    download.run(SourceConfig(path=source, columns={"url": "URL", "caption": "TEXT"}), cfg,
                 RayConfig(num_cpus=args.cpus), ShardStore(out))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()

    import ray

    from tessera.config.download import DownloadConfig, SyntheticConfig, UrlPolicy
    from tessera.demo.synthetic import SyntheticServer, make_rows, write_parquet

    cfg = DownloadConfig(shard_size=args.shard_size, thread_count=args.threads, timeout=10,
                         max_tasks_in_flight=args.cpus, urls=UrlPolicy(allow_loopback=True))
    work = tempfile.mkdtemp(prefix="tessera-bench-download-")
    try:
        with SyntheticServer(seed=0) as server:
            for i in range(args.images):  # render every image before timing
                server._server.image(i)
            source = os.path.join(work, "source.parquet")
            write_parquet(make_rows(SyntheticConfig(num_images=args.images, bad_records=False), server.base),
                          source, server.port)
            plain = plain_img2dataset(source, os.path.join(work, "plain"), args, cfg)
            ray_start = start_ray(args)
            ours = tessera_download(source, os.path.join(work, "tessera"), args, cfg)
            ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"images: {args.images}, shards of {args.shard_size}, {args.cpus} CPUs, {args.threads} threads each")
    print(f"plain img2dataset : {args.images / plain:8.1f} images/s ({plain:.1f} s)")
    print(f"tessera download  : {args.images / ours:8.1f} images/s ({ours:.1f} s, Ray already up)")
    print(f"local Ray start   : {ray_start:.1f} s")
    print(f"ratio (tessera / img2dataset): {plain / ours:.2f}x")
    print(f"ratio with the Ray start     : {plain / (ours + ray_start):.2f}x")


if __name__ == "__main__":
    main()
