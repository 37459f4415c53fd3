"""metrics.jsonl and TensorBoard events under a run stage, on a local path or any fsspec URL.

Rank 0 writes. On resume, lines of steps after the checkpoint are dropped, so that the file reads
like one uninterrupted run (and TensorBoard purges those steps too).
"""
from __future__ import annotations

import io
import json
import math
import threading
from typing import Callable

from tessera.core.store import ShardStore

FILE = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run: ShardStore, resume_step: int, enabled: bool, tensorboard: bool = True):
        self.run, self.enabled, self.writer = run, enabled, None
        self.lines: list[str] = []
        if not enabled:
            return
        if run.exists(FILE):
            with run.fs.open(run.path(FILE), "r") as f:
                self.lines = [ln for ln in f.read().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard writes through fsspec itself for URLs (memory://, s3://, gs://, ...).
            self.writer = SummaryWriter(run.url("tensorboard"), purge_step=resume_step + 1)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        self.lines.append(json.dumps({"step": step, **values}))
        self.run.write_bytes(("\n".join(self.lines) + "\n").encode(), FILE)
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()

    def image(self, step: int, png: bytes) -> None:
        if self.writer is not None:
            import numpy as np
            from PIL import Image

            self.writer.add_image("samples", np.asarray(Image.open(io.BytesIO(png))), step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str) -> list[dict]:
    run = ShardStore(run_dir)
    if not run.exists(FILE):
        return []
    with run.fs.open(run.path(FILE), "r") as f:
        return [json.loads(ln) for ln in f.read().splitlines() if ln]


def read_tensorboard_scalars(run_dir: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar from the run's TensorBoard events (local or fsspec)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(ShardStore(run_dir).url("tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


class MetricsTail:
    """Follows a run's metrics.jsonl while training writes it (on Ray workers or in this process),
    from a thread of the driver: `on_step(row)` once for each step logged after it started. The
    driver is where the step lines are printed, once each, and where a flow reports progress."""

    def __init__(self, run_dir: str, on_step: Callable[[dict], None], every: float = 2.0):
        self.run_dir, self.on_step, self.every = run_dir, on_step, every
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="metrics-tail", daemon=True)
        self.seen = 0

    def __enter__(self) -> "MetricsTail":
        rows = self._rows()
        self.seen = rows[-1]["step"] if rows else 0
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.poll()

    def _rows(self) -> list[dict]:
        try:
            return read_metrics(self.run_dir)
        except (OSError, ValueError):  # the file is being rewritten: read it on the next poll
            return []

    def poll(self) -> None:
        for row in self._rows():
            if row["step"] > self.seen:
                self.seen = row["step"]
                self.on_step(row)

    def _follow(self) -> None:
        while not self.stop.wait(self.every):
            self.poll()
