from __future__ import annotations

from pydantic import Field

from tessera.config.base import Section


class StageLimits(Section):
    """How one stage (or one pass of a global decision) runs its shards on Ray."""

    # Tasks submitted at once. None: every shard (capped by the stage's own default); the tasks
    # that wait for a free CPU or GPU are the demand an autoscaling cluster adds nodes for.
    max_in_flight: int | None = Field(default=None, ge=1)
    # Seconds one attempt at one shard may take; a slower one is cancelled and counted as a
    # failed attempt (retried, then written down as {stage}/{shard}.failed). None: no limit.
    shard_timeout_s: float | None = Field(default=None, gt=0)
    # Shards one Ray task processes in turn (each still marked, retried and timed on its own).
    # None: one per task for a stage; for a pass of a global decision, as many as keep it within
    # about 2,048 tasks, since at 100,000 shards Ray's cost per task outweighs a pass's work.
    shards_per_task: int | None = Field(default=None, ge=1)


class RayConfig(Section):
    # None: start a local Ray. "auto" or "ray://host:10001": join that cluster.
    address: str | None = None
    # CPUs for a local Ray (None: all of this machine's).
    num_cpus: int | None = None
    # Per stage name (download, score, select, caption, tokenize, report, ...): limits for its
    # shards, e.g. {download: {shard_timeout_s: 1800}, select: {max_in_flight: 512}}.
    stages: dict[str, StageLimits] = {}
