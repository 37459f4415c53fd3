from __future__ import annotations

from tessera.config.base import Section


class RayConfig(Section):
    # None: start a local Ray. "auto" or "ray://host:10001": join that cluster.
    address: str | None = None
    # CPUs for a local Ray (None: all of this machine's).
    num_cpus: int | None = None
