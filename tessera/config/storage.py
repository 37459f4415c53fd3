"""The `storage` section: how every filesystem the project opens reaches object storage.

`apply_storage` turns the section into fsspec's per-protocol defaults (`fsspec.config.conf`),
which fsspec applies to every filesystem it creates, whoever opens it: the store, the source
readers, img2dataset, checkpoints. The same defaults go into `FSSPEC_S3` / `FSSPEC_GCS`, which
fsspec reads when it is imported, so a Ray worker started with the driver's environment (see
`forwarded_env`) opens the same filesystems as the driver.

Directory listings are never cached by default (`use_listings_cache: false`): fsspec's listing
cache never expires, and a process that trusts it never sees the objects other processes wrote.
"""
from __future__ import annotations

import json
import os
from typing import Any

from pydantic import Field

from tessera.config.base import Section

# fsspec protocol -> the environment variable fsspec reads its defaults from at import.
PROTOCOL_ENV = {"s3": "FSSPEC_S3", "gcs": "FSSPEC_GCS"}
DEFAULTS: dict[str, dict[str, Any]] = {"s3": {"use_listings_cache": False}, "gcs": {"use_listings_cache": False}}

# Variables a Ray worker needs to reach the same storage as the driver, when the driver has them.
FORWARDED_PREFIXES = ("FSSPEC_", "AWS_", "GOOGLE_", "GCLOUD_")
FORWARDED_NAMES = ("S3_ENDPOINT", "CLOUDSDK_CONFIG", "TESSERA_MODEL_CACHE")


class StorageConfig(Section):
    # An S3-compatible endpoint for s3:// URLs (MinIO, Cloudflare R2, Ceph, an on-prem store), e.g.
    # http://minio.internal:9000. None: AWS itself, or AWS_ENDPOINT_URL(_S3) when set.
    endpoint: str | None = None
    # The S3 region (None: the AWS_REGION / AWS_DEFAULT_REGION or the profile's).
    region: str | None = None
    # Public buckets without credentials (s3:// and gs://).
    anonymous: bool = False
    # Extra fsspec options per protocol, passed to every filesystem of that protocol, e.g.
    # {s3: {requester_pays: true}, gcs: {project: my-project}}. They win over the keys above.
    options: dict[str, dict[str, Any]] = {}
    # One writer per data_root: a run's lease counts as abandoned (and is taken over) when its
    # heartbeat, renewed every quarter of this, is older than this many seconds.
    lease_stale_after_s: float = Field(default=300.0, ge=4)


def fsspec_options(cfg: StorageConfig, base: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Protocol -> fsspec keyword defaults: the defaults, then `base` (what the environment set),
    then the section."""
    out = {proto: dict(kw) for proto, kw in DEFAULTS.items()}
    for proto, kw in (base or {}).items():
        out.setdefault(proto, {}).update(kw)
    s3 = out.setdefault("s3", {})
    if cfg.endpoint:
        s3["endpoint_url"] = cfg.endpoint
    if cfg.region:
        s3.setdefault("client_kwargs", {})["region_name"] = cfg.region
    if cfg.anonymous:
        s3["anon"] = True
        out.setdefault("gcs", {})["token"] = "anon"
    for proto, kw in cfg.options.items():
        out.setdefault("gcs" if proto == "gs" else proto, {}).update(kw)
    return out


_environment_defaults: dict[str, dict[str, Any]] | None = None
_endpoint_vars: set[str] = set()


def apply_storage(cfg: StorageConfig) -> dict[str, dict[str, Any]]:
    """Make `cfg` the storage settings of this process and of the Ray workers it starts.
    Idempotent: applying another section replaces what the previous one set."""
    import fsspec.config

    global _environment_defaults
    if _environment_defaults is None:  # what FSSPEC_* said before any section was applied
        _environment_defaults = {p: dict(fsspec.config.conf.get(p, {})) for p in PROTOCOL_ENV}
    options = fsspec_options(cfg, _environment_defaults)
    for proto, kw in options.items():
        fsspec.config.conf[proto] = kw
        if proto in PROTOCOL_ENV:
            os.environ[PROTOCOL_ENV[proto]] = json.dumps(kw)
    # boto3 users that do not go through fsspec (TensorBoard's S3 writer) read these.
    for var in _endpoint_vars:
        os.environ.pop(var, None)
    _endpoint_vars.clear()
    if cfg.endpoint:
        for var in ("AWS_ENDPOINT_URL_S3", "S3_ENDPOINT"):
            if var not in os.environ:
                os.environ[var] = cfg.endpoint
                _endpoint_vars.add(var)
    return options


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The storage variables of this process (credentials, endpoints, fsspec defaults) for Ray
    workers' runtime environment."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if k.startswith(FORWARDED_PREFIXES) or k in FORWARDED_NAMES}
