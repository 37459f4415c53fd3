"""`tessera status`: the terminal view of a long run, read from the store's markers only.

Per stage: shards done, failed (the runtime's `{stage}/{shard}.failed` records) and still to do;
the funnel so far (reports/funnel.parquet when the flow wrote it, else summed from the markers);
and the newest checkpoint of each training stage of each run under runs_root.
"""
from __future__ import annotations

import posixpath
from collections import Counter

from tessera.config import RunConfig
from tessera.core.runtime import failures
from tessera.core.store import ShardStore
from tessera.pipelines.stages import data_stages
from tessera.training.checkpoint import checkpoint_steps, latest_checkpoint, stage_dir


def stages(cfg: RunConfig) -> list[tuple[str, str, str]]:
    """(name, marker folder, runtime stage that records its failures) of the data stages, in order."""
    out = []
    for step in data_stages(cfg):
        folders = step.marker_folders(cfg.tokenize.resolutions)
        out += [(f"{step.name} {folder.rsplit('/', 1)[-1]}" if step.marked_in_outputs else step.name, folder, step.name)
                for folder in folders]
    return out


def failed_shards(store: ShardStore, stage: str) -> dict[str, str]:
    return {shard: str(record.get("error", "")) for shard, record in failures(store, stage).items()}


def all_shards(store: ShardStore) -> list[str]:
    """Every input shard: as prepared, else as far as markers tell."""
    if store.exists("download/_input", "_prepared.json"):
        return list(store.read_json("download/_input", "_prepared.json")["shards"])
    return sorted(set(store.done_shards("download")) | set(failed_shards(store, "download")))


def funnel_from_markers(store: ShardStore, cfg: RunConfig) -> list[dict]:
    rows: list[dict] = []

    def add(stage, outcome, reason, count):
        if count:
            rows.append({"stage": stage, "outcome": outcome, "reason": reason, "count": int(count)})

    infos = {folder: list(store.markers(folder).values()) for _, folder, _ in stages(cfg)}
    dropped: Counter = Counter()
    for info in infos["download"]:
        dropped.update(info.get("dropped", {}))
    add("download", "downloaded", "", sum(i.get("downloaded", 0) for i in infos["download"]))
    rows += [{"stage": "download", "outcome": "dropped", "reason": r, "count": n} for r, n in sorted(dropped.items())]
    add("score", "scored", "", sum(i.get("samples", 0) for i in infos["score"]))
    add("select", "kept", "", sum(i.get("kept", 0) for i in infos["select"]))
    add("select", "dropped", "", sum(i.get("dropped", 0) for i in infos["select"]))
    for name, folder, _ in stages(cfg)[3:]:  # caption, tokenize: their markers' counts as they are
        totals, reasons = Counter(), Counter()
        for info in infos[folder]:
            totals.update({k: v for k, v in info.items() if isinstance(v, int) and k not in ("rows_in", "bytes")})
            reasons.update(info.get("dropped", {}))
        for outcome, n in sorted(totals.items()):
            add(name.replace(" ", "_"), outcome, "", n)
        for reason, n in sorted(reasons.items()):
            add(name.replace(" ", "_"), "dropped", reason, n)
    return rows


def checkpoints(cfg: RunConfig) -> list[dict]:
    root = ShardStore(cfg.runs_root)
    if not root.exists():
        return []
    runs = sorted(posixpath.basename(p.rstrip("/")) for p in root.fs.ls(root.path(), detail=False)
                  if root.fs.isdir(p))
    out = []
    for run in runs:
        for stage in ("stage1", "stage2"):
            store = ShardStore(stage_dir(cfg.runs_root, run, stage))
            latest = latest_checkpoint(store)
            if latest:
                out.append({"run": run, "stage": stage, "step": checkpoint_steps(store)[-1], "checkpoint": latest})
    return out


def run_status(cfg: RunConfig) -> dict:
    store = ShardStore(cfg.data_root)
    shards = all_shards(store)
    table = []
    for name, folder, stage in stages(cfg):
        done = set(store.done_shards(folder))
        failed = {s: e for s, e in failed_shards(store, stage).items() if s not in done}
        table.append({"stage": name, "shards": len(shards), "done": len(done), "failed": len(failed),
                      "todo": len(set(shards) - done - set(failed)), "errors": dict(sorted(failed.items())[:5])})
    if store.exists("reports", "funnel.parquet"):
        funnel, origin = store.read_table("reports", "funnel.parquet").to_pylist(), "reports/funnel.parquet"
    else:
        funnel, origin = funnel_from_markers(store, cfg), "summed from the stage markers"
    return {"data_root": cfg.data_root, "stages": table, "funnel": funnel, "funnel_from": origin,
            "checkpoints": checkpoints(cfg), "runs_root": cfg.runs_root, "data_root_exists": store.exists()}


def holds_nothing(status: dict) -> bool:
    """Whether neither data_root nor runs_root holds anything Tessera wrote."""
    return (not status["checkpoints"] and not status["funnel"]
            and not any(s["shards"] or s["done"] or s["failed"] for s in status["stages"]))


def format_status(status: dict) -> str:
    if holds_nothing(status):
        where = "does not exist" if not status["data_root_exists"] else "holds no Tessera data"
        return (f"Data root {status['data_root']} {where}, and runs_root {status['runs_root']} holds no checkpoints: "
                "nothing has run with this config yet, or data_root is not the one the runs used "
                "(set it in the config, with --set data_root=..., or TESSERA_DATA_ROOT).")
    lines = [f"Data root: {status['data_root']}", "",
             f"{'stage':<14}{'done':>8}{'failed':>8}{'to do':>8}{'shards':>8}"]
    for s in status["stages"]:
        lines.append(f"{s['stage']:<14}{s['done']:>8}{s['failed']:>8}{s['todo']:>8}{s['shards']:>8}")
        lines += [f"    failed {shard}: {error[:160]}" for shard, error in s["errors"].items()]
    lines += ["", f"Funnel ({status['funnel_from']}):"]
    lines += [f"  {r['stage']:<14}{r['outcome']:<12}{r['reason'] or '':<24}{r['count']:>10}" for r in status["funnel"]]
    if not status["funnel"]:
        lines.append("  (nothing yet)")
    lines += ["", "Newest checkpoints:"]
    lines += [f"  {c['run']}/{c['stage']}: step {c['step']}  {c['checkpoint']}" for c in status["checkpoints"]]
    if not status["checkpoints"]:
        lines.append("  (none yet)")
    return "\n".join(lines)
