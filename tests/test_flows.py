"""The `all` flow: steps in order, one config for all, a subset on request, links to the outputs."""
from __future__ import annotations

import pytest

from tessera.flows import all as all_module  # first: it sets Prefect's defaults before Prefect loads
from tessera.flows.common import Throttle
from tessera.core.store import ShardStore
from prefect import flow  # noqa: E402,I001


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """Replace the four step flows with flows that record their call and write what the real ones
    write, so that `all` itself is what the test exercises."""
    calls: list[tuple[str, dict]] = []
    store = ShardStore(str(tmp_path / "data"))

    @flow(name="curate")
    def curate(config, overrides=None, wait=False):
        calls.append(("curate", {"config": config, "overrides": overrides, "wait": wait}))
        store.write_json({"filters": {}}, "reports", "thresholds.json")
        store.write_bytes(b"<html></html>", "reports", "report.html")
        return {"funnel": [], "data_root": store.root}

    def training(name):
        @flow(name=name)
        def step(config, overrides=None, run=None):
            calls.append((name, {"config": config, "overrides": overrides, "run": run}))
            run_dir = str(tmp_path / "runs" / (run or "demo") / name)
            return {"run_dir": run_dir, "checkpoint": f"{run_dir}/checkpoints/0000010.pt"}
        return step

    @flow(name="sample")
    def sample(config, overrides=None, run=None):
        calls.append(("sample", {"config": config, "overrides": overrides, "run": run}))
        return {"grid": str(tmp_path / "runs" / "grid.png")}

    @flow(name="eval")
    def eval_flow(config, overrides=None, run=None, checkpoints=None, tokenizer=True):
        calls.append(("eval", {"config": config, "overrides": overrides, "run": run, "checkpoints": checkpoints}))
        eval_dir = tmp_path / "runs" / (run or "demo") / "eval"
        return {"page": str(eval_dir / "samples.html"), "metrics_file": str(eval_dir / "metrics.jsonl")}

    for name, fn in (("curate", curate), ("stage1", training("stage1")), ("stage2", training("stage2")),
                     ("sample", sample), ("eval_flow", eval_flow)):
        monkeypatch.setattr(all_module, name, fn)
    return calls, tmp_path


def overrides(tmp_path):
    return [f"data_root={tmp_path}/data", f"runs_root={tmp_path}/runs"]


def test_all_runs_every_step_in_order_with_one_config(recorded):
    calls, tmp_path = recorded
    results = all_module.all_stages(config="configs/demo.yaml", overrides=overrides(tmp_path), run="r1")
    assert [name for name, _ in calls] == ["curate", "stage1", "eval", "stage2", "eval", "sample"]
    assert all(kw["config"] == "configs/demo.yaml" and kw["overrides"] == overrides(tmp_path) for _, kw in calls)
    assert [kw.get("run") for _, kw in calls[1:]] == ["r1"] * 5
    assert [kw["checkpoints"] for name, kw in calls if name == "eval"] == [["untrained", "stage1"], ["stage2"]]
    assert list(results) == ["curate", "stage1", "eval-stage1", "stage2", "eval-stage2", "sample"]

    links = dict(all_module.publish_summary(f"{tmp_path}/data", results))
    assert links["reports/report.html"].endswith("data/reports/report.html")
    assert links["reports/thresholds.json"].endswith("data/reports/thresholds.json")
    assert "reports/funnel.parquet" not in links  # not written by the recording curate
    assert links["stage2 checkpoint"].endswith("r1/stage2/checkpoints/0000010.pt")
    assert links["sample grid"].endswith("grid.png")
    assert links["evaluation: samples by prompt"].endswith("r1/eval/samples.html")


def test_all_runs_only_the_steps_asked_for(recorded):
    calls, tmp_path = recorded
    all_module.all_stages(config="configs/demo.yaml", overrides=overrides(tmp_path),
                          steps=["sample", "stage2"])
    assert [name for name, _ in calls] == ["stage2", "sample"]  # still in pipeline order
    calls.clear()
    all_module.all_stages(config="configs/demo.yaml", overrides=overrides(tmp_path), steps=["eval"])
    assert [(name, kw["checkpoints"]) for name, kw in calls] == [("eval", None)]  # the config's checkpoints


def test_all_refuses_an_unknown_step_or_a_bad_config_before_any_step(recorded):
    calls, tmp_path = recorded
    with pytest.raises(ValueError, match="unknown step"):
        all_module.all_stages(config="configs/demo.yaml", overrides=overrides(tmp_path), steps=["stage3"])
    from tessera.config import ConfigError

    with pytest.raises(ConfigError, match="unknown key"):
        all_module.all_stages(config="configs/demo.yaml", overrides=["download.nope=1"])
    assert calls == []


def test_all_skips_the_steps_a_config_has_no_section_for(recorded):
    calls, tmp_path = recorded
    no_later = overrides(tmp_path) + ["stage2=null", "eval=null"]
    results = all_module.all_stages(config="configs/demo.yaml", overrides=no_later, run="r1")
    assert [name for name, _ in calls] == ["curate", "stage1", "sample"]
    assert list(results) == ["curate", "stage1", "sample"]


def test_prefect_retries_what_may_pass_and_never_what_cannot():
    from prefect import task

    from tessera.core.runtime import ShardFailures
    from tessera.flows.common import RETRIES

    attempts: list[str] = []

    @task(name="toy", **{**RETRIES, "retry_delay_seconds": 0})
    def toy(error: Exception):
        attempts.append(type(error).__name__)
        raise error

    @flow(name="retries")
    def run(error: Exception):
        toy(error)

    cases = [(ConnectionError("connection reset"), 3), (TimeoutError("timed out"), 3),
             (FileNotFoundError("no such file: input.parquet"), 1), (ValueError("bad input"), 1),
             (PermissionError("read-only file system"), 1), (ShardFailures({"score": {"00001": "x"}}), 1)]
    for error, tries in cases:
        attempts.clear()
        with pytest.raises(type(error)):
            run(error)
        assert len(attempts) == tries, (error, attempts)


def test_progress_is_sent_at_most_once_per_interval_and_at_the_end():
    now = [0.0]
    throttle = Throttle(5.0, clock=lambda: now[0])
    sent = []
    for t in (0.5, 1.0, 4.9, 5.0, 6.0, 9.9, 10.1, 10.2):
        now[0] = t
        if throttle.ready():
            sent.append(t)
    assert sent == [5.0, 10.1]
    now[0] = 10.3
    assert throttle.ready(force=True)  # the last shard: sent at once
