"""The stage runtime: one way to map per-shard work over shards on Ray, for every stage.

    driver:  list shards -> skip those done with the current fingerprint -> submit per-shard work
             -> collect per-shard summaries -> record the shards that failed every attempt
    worker:  read the shard -> compute -> write outputs under temporary names -> rename
             -> marker {stage}/{shard}.done last -> return the summary

A work is a function `work(store, shard, **kwargs) -> dict`, run as a CPU (or GPU) Ray task, or
a class whose `__init__(**kwargs)` loads its models once and whose `__call__(store, shard) -> dict`
processes one shard, run in a pool of Ray actors that stay loaded across shards. Either way the
work writes its own outputs and returns a small summary (counts per reason, bytes): the driver
never sees a row, so its memory grows with the number of shards, never with the number of rows.

The marker holds the summary, the shard's fingerprint (the lineage of its inputs) and any stamp
the stage adds. A rerun skips a shard whose marker carries the current fingerprint, and redoes
one whose inputs changed. An error that cannot succeed on a retry (bad input, a missing file:
tessera.core.errors) is not retried. A shard that still fails after its retries is written down as
{stage}/{shard}.failed; every other shard finishes, and the caller decides what a failure means
(the flows finish the run, then end Failed with the list; a rerun redoes exactly those shards).
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from tqdm.auto import tqdm

from tessera.config.ray import StageLimits
from tessera.core.crashpoints import crash_point
from tessera.core.errors import is_permanent
from tessera.core.store import ShardStore

log = logging.getLogger(__name__)
FAILED = ".failed"
# Tasks in flight when neither the stage nor the config says: every shard up to this many.
DEFAULT_MAX_IN_FLIGHT = 1024
# A pass of a global decision (map_shards) runs in about this many Ray tasks at most, each taking
# its names in turn: its per-name work is small, and 100,000 one-shard tasks per pass would cost
# more in Ray's scheduling than in work. A stage runs one shard per task unless its limits say.
TASKS_PER_PASS = 2048


@dataclass
class StageRun:
    """What one pass of a stage did: shard -> summary for the shards it ran, and the failures."""

    stage: str
    done: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: int = 0


class ShardFailures(RuntimeError):
    """Shards failed after every retry; the others finished and are marked done."""

    def __init__(self, failures: dict[str, dict[str, str]]):
        self.failures = failures  # stage -> shard -> error
        lines = [f"  {stage} shard {shard}: {error}" for stage, shards in failures.items()
                 for shard, error in sorted(shards.items())]
        count = sum(len(s) for s in failures.values())
        more = f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else ""
        super().__init__(f"{count} shard(s) failed after all retries; every other shard is done, and a rerun "
                         "redoes exactly these:\n" + "\n".join(lines[:20]) + more)


# Markers --------------------------------------------------------------------------------------
def matches(info: dict | None, fingerprint: str | None) -> bool:
    """Whether a shard's marker (None when there is none) says it is done with these inputs."""
    return info is not None and (fingerprint is None or info.get("fingerprint") == fingerprint)


def failures(store: ShardStore, stage: str) -> dict[str, dict]:
    """The shards of a stage whose last attempt failed: shard -> {stage, shard, error, attempts}
    (one listing and one batched read)."""
    paths = {store.path(stage, n): n[: -len(FAILED)] for n in store.list(stage, FAILED)}
    blobs = store.fs.cat(list(paths), on_error="omit") if paths else {}
    return {shard: json.loads(blobs[path]) for path, shard in paths.items() if path in blobs}


def _clear_failure(store: ShardStore, stage: str, shard: str) -> None:
    if store.exists(stage, shard + FAILED):
        store.fs.rm(store.path(stage, shard + FAILED))


def _describe(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error  # a Ray task error wraps the worker's exception
    text = f"{type(cause).__name__}: {cause}".strip().splitlines()
    return (text[0] if text else type(cause).__name__)[:500]


# Limits: tasks in flight and time per shard, per stage ----------------------------------------------
_stage_limits: dict[str, StageLimits] = {}


def set_stage_limits(limits: dict[str, StageLimits]) -> None:
    """The config's per-stage limits (`ray.stages`), for every stage this process runs from now on."""
    _stage_limits.clear()
    _stage_limits.update(limits)


def stage_limits(desc: str) -> StageLimits:
    """The limits of a stage, or of a pass named `stage:pass` (its own entry, else its stage's)."""
    return _stage_limits.get(desc) or _stage_limits.get(desc.split(":", 1)[0]) or StageLimits()


def in_flight_limit(shards: int, given: int | None, limits: StageLimits) -> int:
    """Tasks submitted at once: the config's limit, else the stage's, else every shard (up to
    DEFAULT_MAX_IN_FLIGHT). Never the CPUs present now: tasks waiting for resources are the demand
    that makes an autoscaling cluster add nodes."""
    return max(1, min(shards, limits.max_in_flight or given or DEFAULT_MAX_IN_FLIGHT))


class _Watchdog:
    """Ends the worker process when one shard takes longer than its timeout. A hung call cannot be
    interrupted from inside; ending the process frees its resources, the driver sees the worker
    die, and counts it as a failed attempt (retried, then written down as failed)."""

    def __init__(self, what: str, timeout_s: float | None):
        self.timer = None
        if timeout_s:
            self.timer = threading.Timer(timeout_s, self._expire, (what, timeout_s))
            self.timer.daemon = True

    @staticmethod
    def _expire(what: str, timeout_s: float) -> None:
        # Straight to stderr: a logging handler's lock may be held by the hung thread.
        os.write(2, f"{what}: no result after shard_timeout_s={timeout_s}; ending this worker so that the "
                    "shard is retried.\n".encode())
        os._exit(75)

    def __enter__(self):
        if self.timer:
            self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.timer:
            self.timer.cancel()


# The worker side --------------------------------------------------------------------------------
def process_shard(work: Callable[..., dict], store: ShardStore, stage: str | None, shard: str,
                  fingerprint: str | None, stamp: dict, kwargs: dict, shard_kwargs: dict,
                  timeout_s: float | None = None) -> dict:
    """Run one shard's work; for a stage, write its marker last. Returns the summary."""
    start = time.monotonic()
    with _Watchdog(f"{stage or 'pass'} shard {shard}", timeout_s):
        summary = work(store, shard, **kwargs, **shard_kwargs)
    if stage is None:  # a pass of a global decision: its small answer goes back as it is
        return summary
    if not isinstance(summary, dict):
        raise TypeError(f"{stage}: the work for shard {shard} returned {type(summary).__name__}, not a summary dict")
    # Without input fingerprints (the first stage) the work's own, a digest of what it wrote, stays.
    own = summary.get("fingerprint") if fingerprint is None else fingerprint
    summary = {**summary, **stamp, "fingerprint": own, "seconds": round(time.monotonic() - start, 3)}
    crash_point("before_marker", stage, shard)
    store.mark_done(stage, shard, summary)
    _clear_failure(store, stage, shard)
    return summary


def process_batch(work: Callable[..., dict], store: ShardStore, stage: str | None,
                  items: list[tuple[str, str | None, dict]], stamp: dict, kwargs: dict,
                  timeout_s: float | None = None) -> list[tuple[bool, Any]]:
    """Run several shards' work in turn in one task: per (shard, fingerprint, shard_kwargs) item,
    (True, summary), or (False, (error, permanent)) when it raised: one failing shard never takes
    the others of its task with it, and is retried on its own."""
    out = []
    for shard, fingerprint, shard_kwargs in items:
        try:
            out.append((True, process_shard(work, store, stage, shard, fingerprint, stamp, kwargs, shard_kwargs,
                                            timeout_s)))
        except Exception as e:  # noqa: BLE001 - answered per shard; the driver retries or records it
            out.append((False, (_describe(e), is_permanent(e))))
    return out


class ShardActor:
    """One replica of a model-holding work class; processes one shard per call."""

    def __init__(self, work_class: type, kwargs: dict, threads: int | None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.work = work_class(**kwargs)

    def process(self, store: ShardStore, stage: str | None, shard: str, fingerprint: str | None, stamp: dict,
                shard_kwargs: dict, timeout_s: float | None = None) -> dict:
        return process_shard(self.work, store, stage, shard, fingerprint, stamp, {}, shard_kwargs, timeout_s)


# The driver side --------------------------------------------------------------------------------
def _timeout_note(error: BaseException, limits: StageLimits) -> str:
    """A worker that died under a shard timeout was most likely ended by its watchdog: say so."""
    import ray

    died = isinstance(error, (ray.exceptions.WorkerCrashedError, ray.exceptions.RayActorError))
    return f" (a shard still running after shard_timeout_s={limits.shard_timeout_s} ends its worker)" \
        if died and limits.shard_timeout_s else ""


class _Pool:
    """Submits shards to Ray tasks, or to a fixed pool of actors (replacing one that dies). The
    keyword arguments are put in Ray's object store once, not sent with every task. An actor gets
    shards only once it has started: one the cluster cannot place (yet) never holds a shard that
    the placed ones could process."""

    def __init__(self, work, kwargs: dict, num_cpus: float, num_gpus: float, actors: int | None):
        import ray

        self.is_class = inspect.isclass(work)
        opts = {"num_cpus": num_cpus, "num_gpus": num_gpus}
        if self.is_class:
            self.actor_class = ray.remote(max_restarts=0, **opts)(ShardActor)
            self.args = (work, kwargs, max(1, int(num_cpus)) if num_gpus == 0 else None)
        self.idle: list[Any] = []
        self.starting: dict[Any, Any] = {}  # readiness ref -> actor
        self.busy: dict[Any, Any] = {}  # ref -> actor
        if self.is_class:
            for _ in range(max(1, actors or 1)):
                self._new_actor()
        else:
            self.task = ray.remote(max_retries=0, **opts)(process_batch)
            self.work, self.kwargs = work, ray.put(kwargs)

    def _new_actor(self) -> None:
        actor = self.actor_class.remote(*self.args)
        self.starting[actor.__ray_ready__.remote()] = actor

    def started(self, ref) -> bool:
        """Whether `ref` was an actor's readiness; that actor then takes shards. One whose
        constructor failed takes them too: its shards fail with the constructor's error."""
        actor = self.starting.pop(ref, None)
        if actor is not None:
            self.idle.append(actor)
        return actor is not None

    def can_submit(self, in_flight: int, max_in_flight: int) -> bool:
        return bool(self.idle) if self.is_class else in_flight < max_in_flight

    def submit(self, store, stage, items: list[tuple[str, str | None, dict]], stamp, timeout_s: float | None):
        """One task for these (shard, fingerprint, shard_kwargs) items; an actor takes one item."""
        if not self.is_class:
            return self.task.remote(self.work, store, stage, items, stamp, self.kwargs, timeout_s)
        actor = self.idle.pop()
        (shard, fingerprint, shard_kwargs), = items
        ref = actor.process.remote(store, stage, shard, fingerprint, stamp, shard_kwargs, timeout_s)
        self.busy[ref] = actor
        return ref

    def answers(self, ref) -> list[tuple[bool, Any]]:
        """The per-item answers of a finished task (raises what the task or the actor raised)."""
        import ray

        answer = ray.get(ref)
        return [(True, answer)] if self.is_class else answer

    def release(self, ref, error: BaseException | None) -> None:
        import ray

        if not self.is_class:
            return
        actor = self.busy.pop(ref)
        if isinstance(error, ray.exceptions.RayActorError):
            log.warning("A model actor died (%s); starting a new one.", _describe(error))
            self._new_actor()
        else:
            self.idle.append(actor)

    def close(self) -> None:
        import ray

        for actor in [*self.idle, *self.starting.values(), *self.busy.values()]:
            ray.kill(actor)


def _map(desc: str, store: ShardStore, names: list[str], work, *, stage: str | None, kwargs: dict,
         shard_kwargs, fingerprints, stamp: dict, num_cpus: float, num_gpus: float, actors: int | None,
         retries: int, max_in_flight: int | None, on_result, unit: str, per_task: int | None = None) -> dict[str, str]:
    """The one submission loop: every name once, retried; on_result(name, summary) as each arrives.
    A task takes `per_task` names in turn (an actor one); a name that fails is retried on its own.
    Returns the names that failed every attempt, with their errors."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError(f"{desc}: start Ray first (tessera.core.raytools.init_ray)")
    limits = stage_limits(stage or desc)
    pool = _Pool(work, kwargs, num_cpus, num_gpus, actors)
    batch = 1 if pool.is_class else max(1, limits.shards_per_task or per_task or 1)
    # Popped from the end, in order: (names, attempt).
    queue = [(names[i:i + batch], 0) for i in reversed(range(0, len(names), batch))]
    max_in_flight = in_flight_limit(len(queue), max_in_flight, limits)
    pending: dict[Any, tuple[list[str], int]] = {}
    failed: dict[str, str] = {}
    rows = None  # stays None while no answer counts rows (a pass's partial answers)

    def failure(name: str, attempt: int, error: str, permanent: bool) -> int:
        """Queue the name again, or write it down as failed; returns the names finished (0 or 1)."""
        if attempt < retries and not permanent:
            log.warning("%s: %s failed (attempt %d of %d): %s", desc, name, attempt + 1, retries + 1, error)
            queue.append(([name], attempt + 1))
            return 0
        failed[name] = error
        log.error("%s: %s failed after %d attempt(s)%s: %s", desc, name, attempt + 1,
                  " (not retried: it cannot succeed on a retry)" if permanent else "", error)
        if stage is not None:
            store.write_json({"stage": stage, "shard": name, "error": error, "attempts": attempt + 1},
                             stage, name + FAILED)
        return 1

    try:
        with tqdm(total=len(names), desc=desc, unit="shard", mininterval=1) as bar:
            while queue or pending:
                while queue and pool.can_submit(len(pending), max_in_flight):
                    group, attempt = queue.pop()
                    items = [(name, fingerprints.get(name) if fingerprints is not None else None,
                              shard_kwargs(name) if shard_kwargs else {}) for name in group]
                    pending[pool.submit(store, stage, items, stamp, limits.shard_timeout_s)] = (group, attempt)
                ready, _ = ray.wait([*pending, *pool.starting], num_returns=1)
                if pool.started(ready[0]):
                    continue
                group, attempt = pending.pop(ready[0])
                finished = 0
                try:
                    answers = pool.answers(ready[0])
                except Exception as e:  # noqa: BLE001 - the task or its worker failed: each of its names did
                    pool.release(ready[0], e)
                    error = _describe(e) + _timeout_note(e, limits)
                    finished = sum(failure(name, attempt, error, is_permanent(e)) for name in group)
                    answers = []
                else:
                    pool.release(ready[0], None)
                for name, (ok, answer) in zip(group, answers):
                    if not ok:
                        finished += failure(name, attempt, *answer)
                        continue
                    finished += 1
                    if isinstance(answer, dict) and "rows_in" in answer:
                        rows = (rows or 0) + int(answer["rows_in"] or 0)
                    if on_result:
                        on_result(name, answer)
                    crash_point("after_result", desc.rsplit(":", 1)[-1], name)
                # Rows per second beside the shards' rate and ETA: a shard can hold 10,000 rows.
                counts = {} if rows is None else {
                    unit: rows, f"{unit}/s": f"{rows / max(bar.format_dict['elapsed'], 1e-9):.1f}"}
                bar.set_postfix({**counts, "failed": len(failed)}, refresh=False)
                bar.update(finished)
    finally:
        pool.close()
    return failed


def map_shards(desc: str, store: ShardStore, names: list[str], work, *, kwargs: dict | None = None,
               fold: Callable[[str, Any], None] | None = None, shard_kwargs: Callable[[str], dict] | None = None,
               num_cpus: float = 1, retries: int = 2, max_in_flight: int | None = None) -> None:
    """Run `work(store, name, **kwargs)` for each name (a shard, a partition) as a Ray task and pass
    each answer (small: a sketch, counts, a few candidate rows) to `fold(name, answer)` as it arrives,
    keeping none: the passes of a global decision, which leave no marker. They run in at most about
    TASKS_PER_PASS tasks, each taking its names in turn; answers still arrive one name at a time. Raises ShardFailures when
    a name still fails after its retries, since the decision cannot be made without it."""
    failed = _map(desc, store, names, work, stage=None, kwargs=kwargs or {}, shard_kwargs=shard_kwargs,
                  fingerprints=None, stamp={}, num_cpus=num_cpus, num_gpus=0, actors=None, retries=retries,
                  max_in_flight=max_in_flight, on_result=fold, unit="rows",
                  per_task=math.ceil(len(names) / TASKS_PER_PASS))
    if failed:
        raise ShardFailures({desc: failed})


# Restamping: the markers of shards whose outputs stay, given new stamp fields (a new selection) --
RESTAMP_BATCH = 500  # markers per restamp task


def _restamp_batch(store: ShardStore, first: str, folder: str, shards: list[str], stamp: dict) -> dict:
    """One task: read its markers in one batched fetch, write each back with the stamp's fields."""
    written = 0
    for shard, info in store.read_markers(folder, shards).items():
        if any(info.get(k) != v for k, v in stamp.items()):
            store.mark_done(folder, shard, {**info, **stamp})
            written += 1
    return {"restamped": written}


def restamp(store: ShardStore, folder: str, shards: list[str], stamp: dict, retries: int = 2) -> int:
    """Add `stamp`'s fields to the markers of these shards, in Ray tasks of RESTAMP_BATCH markers:
    the driver sends names, never reads or writes a marker itself. Returns the markers written."""
    if not shards or not stamp:
        return 0
    batches = {shards[i]: shards[i:i + RESTAMP_BATCH] for i in range(0, len(shards), RESTAMP_BATCH)}
    written = []
    map_shards(f"{folder}:restamp", store, list(batches), _restamp_batch, retries=retries,
               kwargs={"folder": folder, "stamp": stamp}, shard_kwargs=lambda first: {"shards": batches[first]},
               fold=lambda _, answer: written.append(answer["restamped"]))
    return sum(written)


def run_stage(stage: str, store: ShardStore, shards: list[str], work, *, kwargs: dict | None = None,
              fingerprints: dict[str, str] | None = None, stamp: dict | None = None,
              num_cpus: float = 1, num_gpus: float = 0, actors: int | None = None, retries: int = 2,
              max_in_flight: int | None = None, outputs: tuple[str, ...] = (),
              shard_kwargs: Callable[[str], dict] | None = None,
              on_shard: Callable[[str, dict], None] | None = None, unit: str = "img",
              desc: str | None = None) -> StageRun:
    """Run `work` over every shard not done with its current fingerprint; see the module doc.

    `kwargs` go to every call (a class's constructor), `shard_kwargs(shard)` to that shard's call.
    `fingerprints` (shard -> lineage of its inputs) makes a shard whose inputs changed stale;
    `stamp` adds fields to every marker (and is refreshed on the markers of skipped shards).
    `outputs` are the folders whose temporaries a crashed run may have left. `desc` labels the
    progress bar (the stage's name by default); a summary's `rows_in` moves its row count.
    """
    stamp = stamp or {}
    run = StageRun(stage)
    for folder in (stage, *outputs):
        store.clear_temporaries(folder)
    markers = store.markers(stage, fields=("fingerprint", *stamp))
    todo, stale_stamps, stale = [], [], []
    for shard in shards:
        info = markers.get(shard)
        if matches(info, fingerprints.get(shard) if fingerprints is not None else None):
            run.skipped += 1
            if any(info.get(k) != v for k, v in stamp.items()):
                stale_stamps.append(shard)
        else:
            if info is not None:  # stale: its old outputs must never look done again
                stale.append(store.path(*store.marker(stage, shard)))
            todo.append(shard)
    if stale:
        store.fs.rm(stale)
    del markers
    restamp(store, stage, stale_stamps, stamp, retries=retries)
    log.info("%s: %d of %d shards to do (%d already done).", stage, len(todo), len(shards), run.skipped)
    if not todo:
        return run

    def record(shard: str, summary: dict) -> None:
        run.done[shard] = summary
        if on_shard:
            on_shard(shard, summary)

    run.failed = _map(desc or stage, store, todo, work, stage=stage, kwargs=kwargs or {}, shard_kwargs=shard_kwargs,
                      fingerprints=fingerprints, stamp=stamp, num_cpus=num_cpus, num_gpus=num_gpus,
                      actors=actors, retries=retries, max_in_flight=max_in_flight, on_result=record, unit=unit)
    return run
