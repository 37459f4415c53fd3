"""A data stage, declared: its name (the folder of its markers and failure records), what it reads
and writes under data_root, its per-shard work and the result type whose funnel rows it returns.

The runtime runs the work over the shards (tessera.core.runtime.run_stage); `tessera status` and
the docs read the declarations. A folder may hold `{res}`, one per resolution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tessera.core.funnel import StageResult


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    work: Callable | type  # a function (a Ray task per shard) or a class (actors holding models across shards)
    result: type[StageResult]
    marked_in_outputs: bool = False  # markers beside each output (tokens/{res}) instead of in `name`

    def folders(self, templates: tuple[str, ...], resolutions: list[int]) -> list[str]:
        return [t.format(res=r) for t in templates for r in (resolutions if "{res}" in t else [None])]

    def marker_folders(self, resolutions: list[int]) -> list[str]:
        """Where the markers of finished shards are."""
        return self.folders(self.outputs, resolutions) if self.marked_in_outputs else [self.name]
