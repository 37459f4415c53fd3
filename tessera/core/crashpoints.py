"""Fixed points where a test can kill a process the way `kill -9` or a power cut would.

`TESSERA_CRASH_AT=POINT[:STAGE[:SHARD]]` kills the process (SIGKILL: no cleanup, no finally
blocks) when it reaches POINT, for that stage and shard when given. Unset, a crash point costs
one dictionary lookup. The points:

    mid_output     an output file written under its temporary name, not yet renamed into place
    before_marker  every output of a shard in place, its completion marker not yet written
    after_result   the driver has taken in the answer of one shard (or partition) of a stage or of
                   a pass; STAGE is the pass's name without its stage (`select:dedup-exact` is
                   `dedup-exact`), the others of the pass may still be running
    checkpoint_parts  (stage `checkpoint`, shard `step-NNNNNNNN`) every part of a training
                   checkpoint written by DCP, its `.metadata` not yet
"""
from __future__ import annotations

import os
import signal

ENV = "TESSERA_CRASH_AT"
POINTS = ("mid_output", "before_marker", "after_result", "checkpoint_parts")


def crash_point(point: str, stage: str | None = None, shard: str | None = None) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    want = spec.split(":")
    if want[0] != point or (len(want) > 1 and want[1] != stage) or (len(want) > 2 and want[2] != shard):
        return
    os.kill(os.getpid(), signal.SIGKILL)
