"""`tessera status` on a half-finished store: shards done, failed and to do, the funnel, checkpoints."""
from __future__ import annotations

import yaml

from tessera import cli
from tessera.config import RunConfig
from tessera.core.funnel import write_funnel
from tessera.status import run_status
from tessera.core.store import ShardStore


def half_finished(tmp_path) -> RunConfig:
    tree = {"name": "t", "data_root": str(tmp_path / "data"), "runs_root": str(tmp_path / "runs"),
            "source": {"path": "unused"}, "tokenize": {"resolutions": [256]}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    store = ShardStore(tree["data_root"])
    store.write_json({"shards": ["00000", "00001", "00002", "00003"]}, "download/_input", "_prepared.json")
    store.mark_done("download", "00000", {"rows_in": 10, "downloaded": 8, "dropped": {"http_404": 2}})
    store.mark_done("download", "00001", {"rows_in": 10, "downloaded": 9, "dropped": {"corrupt_image": 1}})
    store.write_json({"stage": "download", "shard": "00002", "error": "OSError: disk full", "attempts": 4},
                     "download", "00002.failed")
    store.mark_done("score", "00000", {"samples": 8, "unreadable": {}})
    store.write_json({"stage": "score", "shard": "00001", "error": "RuntimeError: tar unreadable", "attempts": 4},
                     "score", "00001.failed")
    store.mark_done("select", "00000", {"kept": 5, "dropped": 3})
    store.mark_done("caption", "00000", {"rows_in": 5, "captioned": 4, "fallback": {"degenerate": 1}})
    store.mark_done("tokens/256", "00000", {"rows_in": 5, "tokenized": 5, "no_caption": 0, "dropped": {},
                                            "bytes": 100})
    # Sharded checkpoints are finished once DCP's .metadata is there; step 9 of r2 is still being written.
    for run, stage, step in (("r1", "stage1", 2), ("r1", "stage1", 4), ("r1", "stage2", 1), ("r2", "stage1", 3)):
        folder = tmp_path / "runs" / run / stage / "checkpoints" / f"step-{step:08d}"
        folder.mkdir(parents=True)
        (folder / ".metadata").write_bytes(b"")
    (tmp_path / "runs" / "r2" / "stage1" / "checkpoints" / "step-00000009").mkdir()
    return RunConfig.model_validate(tree)


def test_status_of_a_half_finished_store(tmp_path):
    status = run_status(half_finished(tmp_path))
    table = {s["stage"]: (s["done"], s["failed"], s["todo"]) for s in status["stages"]}
    assert table == {"download": (2, 1, 1), "score": (1, 1, 2), "select": (1, 0, 3), "caption": (1, 0, 3),
                     "tokenize 256": (1, 0, 3)}
    errors = {s["stage"]: s["errors"] for s in status["stages"]}
    assert errors["download"] == {"00002": "OSError: disk full"}
    assert status["funnel_from"] == "summed from the stage markers"
    funnel = {(r["stage"], r["outcome"], r["reason"]): r["count"] for r in status["funnel"]}
    assert funnel[("download", "downloaded", "")] == 17
    assert funnel[("download", "dropped", "http_404")] == 2 and funnel[("download", "dropped", "corrupt_image")] == 1
    assert funnel[("score", "scored", "")] == 8
    assert funnel[("select", "kept", "")] == 5 and funnel[("select", "dropped", "")] == 3
    assert funnel[("caption", "captioned", "")] == 4 and funnel[("tokenize_256", "tokenized", "")] == 5
    newest = {(c["run"], c["stage"]): c["step"] for c in status["checkpoints"]}
    assert newest == {("r1", "stage1"): 4, ("r1", "stage2"): 1, ("r2", "stage1"): 3}


def test_status_prefers_the_flows_funnel_and_prints(tmp_path, capsys):
    cfg = half_finished(tmp_path)
    write_funnel(ShardStore(cfg.data_root), [{"stage": "download", "outcome": "downloaded", "reason": "", "count": 99}])
    assert cli.main(["status", str(tmp_path / "run.yaml")]) == 0
    out = capsys.readouterr().out
    assert "Funnel (reports/funnel.parquet)" in out and "99" in out
    assert "failed 00002: OSError: disk full" in out
    assert "r1/stage1: step 4" in out and "step-00000004" in out


def test_status_says_when_a_folder_holds_no_tessera_data(tmp_path, capsys):
    tree = {"name": "t", "data_root": str(tmp_path / "nothing-here"), "runs_root": str(tmp_path / "runs"),
            "source": {"path": "unused"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(tree))
    assert cli.main(["status", str(tmp_path / "run.yaml")]) == 0
    assert "does not exist" in capsys.readouterr().out
    (tmp_path / "nothing-here").mkdir()
    assert cli.main(["status", "--config", str(tmp_path / "run.yaml")]) == 0
    out = capsys.readouterr().out
    assert "holds no Tessera data" in out and "data_root" in out and "stage" not in out
    half_finished(tmp_path)  # and with data there, the table
    assert "holds no Tessera data" not in (cli.main(["status", str(tmp_path / "run.yaml")]) or capsys.readouterr().out)
