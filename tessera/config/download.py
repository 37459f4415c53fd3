from __future__ import annotations

from tessera.config.base import Section


class ColumnMap(Section):
    """Where to find each field in the input parquet. LAION-style sets differ in names."""

    url: str = "URL"
    caption: str = "TEXT"
    # Input columns carried into img2dataset's per-sample metadata, when present.
    # A listed column that the input lacks is reported once and skipped, never invented.
    carry: list[str] = [
        "top_caption", "all_captions", "all_similarities", "WIDTH", "HEIGHT",
        "similarity", "hash", "pwatermark", "punsafe", "AESTHETIC_SCORE", "aesthetic",
    ]


class SyntheticConfig(Section):
    """The embedded default: a LAION-COCO-like parquet whose URLs a loopback server answers."""

    num_images: int = 300
    seed: int = 0
    # Add one record of every bad kind (404, timeout, corrupt JPEG, file: URL, ...).
    bad_records: bool = True
    # Plant defects in a share of the pictures (mismatched captions, watermarks, low-aesthetic
    # images, NSFW flags, near-duplicates); the truth file beside the source records them.
    defects: bool = True


class SourceConfig(Section):
    # A parquet file, a folder of them, or a glob; local or fsspec (s3://, gs://, ...).
    # With `synthetic` set, the set is generated to this path first.
    path: str
    columns: ColumnMap = ColumnMap()
    synthetic: SyntheticConfig | None = None


class UrlPolicy(Section):
    schemes: list[str] = ["http", "https"]
    max_length: int = 2048
    # Destinations that are refused unless allowed here, checked before the request,
    # at every connection and after every redirect.
    allow_loopback: bool = False
    allow_private: bool = False
    allow_link_local: bool = False


class DownloadConfig(Section):
    shard_size: int = 10_000
    # img2dataset settings.
    image_size: int = 512
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95
    min_image_size: int = 64
    max_aspect_ratio: float = 3.0
    # Decompression-bomb guard: pixels of the original, checked from the header before decoding.
    max_image_area: int = 89_478_485
    thread_count: int = 64
    timeout: float = 10.0
    retries: int = 0
    user_agent_token: str | None = "tessera"
    disallowed_header_directives: list[str] = ["noai", "noimageai", "noindex", "noimageindex"]
    # Ray: one task per shard, retried on failure, with at most this many in flight.
    max_tasks_in_flight: int = 64
    task_retries: int = 3
    urls: UrlPolicy = UrlPolicy()
