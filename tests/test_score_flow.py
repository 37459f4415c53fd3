"""The Prefect tasks of filtering: they run the stages and publish the report link and tables."""
import pytest

from tessera.config import RunConfig
from tessera.core.store import ShardStore

from .fixtures import write_download_shard
from .test_score import TINY


@pytest.mark.slow
def test_filter_tasks_publish_the_report_and_tables(ray_local, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from tessera.flows.filter_tasks import report_task, score_task, select_task

    cfg = RunConfig.model_validate({"name": "t", "data_root": str(tmp_path / "data"),
                                    "models_root": str(tmp_path / "models"), "ray": {"num_cpus": 2},
                                    "source": {"path": str(tmp_path / "unused.parquet")}, "filters": TINY})
    store = ShardStore(cfg.data_root)
    write_download_shard(store, "00000", n=8)

    @flow
    def filtering() -> list[dict]:
        funnel = [{"stage": "download", "outcome": "downloaded", "reason": "", "count": 8}]
        funnel += score_task(cfg, store).funnel()
        funnel += select_task(cfg, store).funnel()
        report_task(store, funnel, 2)
        return funnel

    with prefect_test_harness(server_startup_timeout=180):
        funnel = filtering()
        with get_client(sync_client=True) as client:
            artifacts = {a.key: a for a in client.read_artifacts()}
    assert sum(r["count"] for r in funnel if r["stage"] == "select") == 8
    assert "file://" in artifacts["filter-report"].data and "report.html" in artifacts["filter-report"].data
    assert artifacts["thresholds"].type == "table"
    assert store.exists("reports", "report.html")
