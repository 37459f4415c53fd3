from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import field_validator, model_validator

from tessera.config.base import Section


class ColumnMap(Section):
    """Where to find each field in the input parquet. LAION-style sets differ in names."""

    url: str = "URL"  # the input's URL column
    caption: str = "TEXT"  # the input's caption column
    # Input columns carried into img2dataset's per-sample metadata, when present.
    # A listed column that the input lacks is reported once and skipped, never invented.
    carry: list[str] = [
        "top_caption", "all_captions", "all_similarities", "WIDTH", "HEIGHT",
        "similarity", "hash", "pwatermark", "punsafe", "AESTHETIC_SCORE", "aesthetic",
    ]


class SyntheticConfig(Section):
    """The embedded default: a LAION-COCO-like parquet whose URLs a loopback server answers."""

    num_images: int = 300  # pictures in the generated set
    seed: int = 0  # the seed of everything generated
    # Add one record of every bad kind (404, timeout, corrupt JPEG, file: URL, ...).
    bad_records: bool = True
    # Plant defects in a share of the pictures (mismatched captions, watermarks, low-aesthetic
    # images, NSFW flags, near-duplicates); the truth file beside the source records them.
    defects: bool = True


class CaptionFiles(Section):
    """Where the caption of an image_folder or webdataset sample comes from: the first found wins."""

    # `txt`: the text file beside the image ({stem}.txt); `json`: a field of {stem}.json.
    sidecars: list[Literal["txt", "json"]] = ["txt", "json"]
    # The JSON fields tried, in order.
    json_fields: list[str] = ["caption", "text"]


class ImageFolderOptions(Section):
    # Image files, by extension (case-insensitive). Other files that are no caption sidecar are
    # counted as `not_an_image`.
    extensions: list[str] = ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]
    # A CSV, parquet or JSON-lines file mapping image paths (relative to `path`) to captions; it
    # comes before the sidecars. Relative to `path` unless absolute or a URL.
    mapping: str | None = None
    image_column: str = "file_name"  # the mapping's column of image paths
    caption_column: str = "text"  # the mapping's caption column


class WebDatasetOptions(Section):
    # Image members, by extension, in order of preference.
    extensions: list[str] = ["jpg", "jpeg", "png", "webp"]


class HfParquetOptions(Section):
    # The image column: a struct {bytes, path} (the datasets `Image` feature) or binary.
    image_column: str = "image"
    caption_column: str = "text"  # the caption column
    # A row group whose columns read take more bytes than this (uncompressed, from the file's
    # metadata) has its rows dropped as `row_group_too_large`: a data page, which may hold the
    # whole row group, is always decoded whole.
    max_row_group_bytes: int = 1 << 30


SourceKind = Literal["laion_parquet", "image_folder", "webdataset", "hf_parquet"]


class SourceConfig(Section):
    # laion_parquet: a parquet of URLs and captions, downloaded. The others are read, not
    # downloaded: image_folder (images with caption sidecars or a mapping file), webdataset
    # (tars of images with .txt/.json, such as img2dataset's output), hf_parquet (Hugging Face
    # datasets parquet with image bytes). All become the same download/{shard} outputs.
    kind: SourceKind = "laion_parquet"
    # laion_parquet, hf_parquet: a parquet file, a folder of them, or a glob. image_folder: a
    # folder. webdataset: a tar, a folder of tars, or a glob. Local or fsspec (s3://, gs://, ...).
    # With `synthetic` set, the set is generated to this path first.
    path: str
    columns: ColumnMap = ColumnMap()
    synthetic: SyntheticConfig | None = None
    captions: CaptionFiles = CaptionFiles()
    image_folder: ImageFolderOptions = ImageFolderOptions()
    webdataset: WebDatasetOptions = WebDatasetOptions()
    hf_parquet: HfParquetOptions = HfParquetOptions()

    @model_validator(mode="after")
    def _options_of_this_kind(self):
        other = [k for k in ("image_folder", "webdataset", "hf_parquet")
                 if k in self.model_fields_set and k != self.kind]
        if other:
            raise ValueError(f"source.{other[0]} is set but source.kind is {self.kind!r}")
        if self.synthetic is not None and self.kind != "laion_parquet":
            raise ValueError("source.synthetic generates a laion_parquet source; set kind: laion_parquet")
        return self


class UrlPolicy(Section):
    # URL schemes that may be fetched.
    schemes: list[str] = ["http", "https"]
    max_length: int = 2048  # longer URLs are dropped as url_too_long
    # Destinations that are refused unless allowed here, checked before the request,
    # at every connection and after every redirect.
    allow_loopback: bool = False
    allow_private: bool = False  # private ranges (10/8, 172.16/12, 192.168/16, fc00::/7, ...)
    allow_link_local: bool = False  # link-local ranges; metadata addresses are never fetched


class CaptionLimits(Section):
    """Applied where a caption enters (downloaded or read), before any later stage or tokenizer."""

    # UTF-8 bytes. A longer caption is cut at a character boundary (`cut`, counted as a repair)
    # or dropped with the reason `caption_too_long` (`drop`).
    max_bytes: int = 4096
    too_long: Literal["cut", "drop"] = "cut"
    # A caption that is not valid UTF-8: bad bytes replaced by U+FFFD (`repair`, counted) or
    # dropped with the reason `bad_caption_encoding` (`drop`).
    bad_encoding: Literal["repair", "drop"] = "repair"


class DownloadConfig(Section):
    shard_size: int = 10_000  # input rows per shard: one Ray task and one output tar each
    # img2dataset settings.
    image_size: int = 512  # side of the resized image
    resize_mode: str = "keep_ratio"  # img2dataset's: no, keep_ratio, keep_ratio_largest, center_crop, border
    resize_only_if_bigger: bool = True
    encode_format: str = "jpg"  # jpg, png or webp
    encode_quality: int = 95
    min_image_size: int = 64  # smallest short side kept, in pixels of the original
    max_aspect_ratio: float = 3.0  # largest long side / short side kept
    # Decompression-bomb guard: pixels of the original, checked from the header before decoding.
    max_image_area: int = 89_478_485
    # Bytes of one image as fetched or read (a response body, a file, a tar member, a parquet
    # cell); a larger one is dropped as `too_large` without being read whole. Also caps every
    # member of every tar read.
    max_image_bytes: int = 32 << 20
    caption_limits: CaptionLimits = CaptionLimits()
    thread_count: int = 64  # download threads per shard task
    # Wall-clock seconds per download: connecting, TLS, redirects and the whole body together.
    timeout: float = 10.0
    retries: int = 0  # img2dataset's retries per URL
    # An egress proxy for every download, e.g. http://proxy.internal:3128. The downloader ignores
    # http_proxy / https_proxy; with a proxy set, hosts in no_proxy are fetched directly.
    proxy: str | None = None
    user_agent_token: str | None = "tessera"  # added to the User-Agent header
    # X-Robots-Tag directives that refuse an image (disallowed_by_site).
    disallowed_header_directives: list[str] = ["noai", "noimageai", "noindex", "noimageindex"]
    # Ray: one task per shard, with at most this many in flight; attempts per shard beyond the first.
    max_tasks_in_flight: int = 64
    shard_retries: int = 3  # attempts per shard beyond the first
    # The URL check before any request.
    urls: UrlPolicy = UrlPolicy()

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = urlsplit(value)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("http", "https") or not parts.hostname or port is None \
                or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"{value!r}: a proxy is written as http://host:port (or https://host:port)")
        return value
