"""Run the download stage on a synthetic set, for the download tests."""
from __future__ import annotations

import json
import random
import tarfile
from urllib.parse import urlsplit

import pyarrow.parquet as pq

from tessera.config.download import DownloadConfig, SourceConfig, SyntheticConfig, UrlPolicy
from tessera.config.ray import RayConfig
from tessera.pipelines import download
from tessera.pipelines.store import ShardStore
from tessera.pipelines.synthetic import SyntheticServer, laion_row, make_rows, write_parquet

TIMEOUT = 2.0


def download_config(**kw) -> DownloadConfig:
    base = dict(shard_size=10, timeout=TIMEOUT, thread_count=8, max_tasks_in_flight=2,
                shard_retries=1, urls=UrlPolicy(allow_loopback=True))
    return DownloadConfig(**{**base, **kw})


def write_source(path: str, server: SyntheticServer, num_images: int, extra_urls=()) -> SourceConfig:
    cfg = SyntheticConfig(num_images=num_images)
    rows = make_rows(cfg, server.base, slow_seconds=TIMEOUT + 3)
    rng = random.Random(1)
    rows += [laion_row(rng, url, "an image", 600, 520) for url in extra_urls]
    write_parquet(rows, path, server.port)
    return SourceConfig(path=path, columns={"url": "URL", "caption": "TEXT"})


def run_download(source: SourceConfig, root: str, cfg: DownloadConfig | None = None):
    store = ShardStore(root)
    return download.run(source, cfg or download_config(), RayConfig(num_cpus=2), store), store


def outcomes(store: ShardStore) -> dict[int, tuple[str, str]]:
    """row_index -> (url, "downloaded" or drop reason), read back from the stage's files."""
    result = {}
    for name in store.list("download", ".tar"):
        shard = name[:-4]
        for row in pq.read_table(store.path("download", f"{shard}.parquet")).to_pylist():
            outcome = "downloaded" if row["status"] == "success" else download.reason_for(row["error_message"])
            assert row["row_index"] not in result
            result[row["row_index"]] = (row["url"], outcome)
        for row in pq.read_table(store.path("download", f"{shard}_rejected.parquet")).to_pylist():
            assert row["row_index"] not in result
            result[row["row_index"]] = (row["url"], row["reason"])
    return result


def url_path(url: str, base: str) -> str:
    """The path part of a URL on the synthetic server (query dropped); other URLs as they are."""
    return urlsplit(url).path if url.startswith(base) else url


def tar_samples(store: ShardStore) -> dict[str, dict]:
    """key -> {ext: bytes} over every download tar."""
    samples: dict[str, dict] = {}
    for name in store.list("download", ".tar"):
        with tarfile.open(store.path("download", name)) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def sample_meta(samples: dict[str, dict]) -> dict[str, dict]:
    return {k: json.loads(v["json"]) for k, v in samples.items()}
