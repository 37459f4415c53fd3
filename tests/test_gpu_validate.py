"""bench.gpu_validate on CPU, tiny, as a GPU machine without network would run it: importing
nothing but the standard library, torch (and what torch itself needs), the kit's packages
(bench/gpu_kit.txt) and this repository."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

# Runs the script with an import hook that refuses every top-level module that the bare GPU
# machine would not have: optional imports then fail there as they would on that machine.
BARE = r"""
import importlib.machinery, importlib.metadata as md, re, runpy, sys, sysconfig

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

def closure(names):
    seen, todo = set(), [norm(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        todo += [norm(re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0]) for r in requires if "extra ==" not in r]
    return seen

kit = [ln.strip() for ln in open("bench/gpu_kit.txt") if ln.strip() and not ln.startswith("#")]
dists = closure(["torch", *kit])
allowed = {m for m, ds in md.packages_distributions().items() if any(norm(d) in dists for d in ds)}
allowed |= set(sys.stdlib_module_names) | {"tessera", "bench", "tests", "__main__"}
refused = set()
stdlib = sysconfig.get_paths()["stdlib"] + "/"

class Bare(importlib.machinery.PathFinder):
    # The path finder, blind to every top-level module the bare machine lacks.

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        spec = super().find_spec(fullname, path, target)
        if top in allowed or (spec and spec.origin and spec.origin.startswith(stdlib)):
            return spec
        refused.add(top)
        return None

sys.meta_path[:] = [Bare if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
sys.argv = ["bench.gpu_validate", *sys.argv[1:]]
try:
    runpy.run_module("bench.gpu_validate", run_name="__main__")
finally:
    print("refused imports:", sorted(refused))
"""


def numbers(row: dict) -> list:
    out = []
    for v in row.values():
        if isinstance(v, dict):
            out += numbers(v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(v)
    return out


def problems(row: dict) -> list:
    out = [row[k] for k in ("error", "skipped") if k in row]
    for v in row.values():
        if isinstance(v, dict):
            out += problems(v)
    return out


@pytest.mark.slow
def test_the_gpu_script_runs_every_step_on_cpu_with_the_kit_only(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", BARE, "--device", "cpu", "--tiny", "--out", str(out),
                           "--llamagen-src", str(tmp_path / "no-llamagen")],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "gpu_validate.json").read_text())
    steps = results["steps"]
    assert sorted(steps) == ["a_parity", "b_accumulation", "c_distributed", "d_throughput", "e_loop",
                             "f_sampling", "g_scoring"]
    for name, row in steps.items():
        assert not problems(row), (name, problems(row))
        assert numbers(row), name
    # A few figures that must hold on any machine.
    assert steps["a_parity"]["flex_vs_dense_logits_rel_err"] < 1e-4
    assert steps["b_accumulation"]["loss_rel_diff"] < 1e-5
    head = steps["b_accumulation"]["loss_head"]  # fp32 on CPU: a few roundings apart
    assert head["chunk"] < head["positions"] and max(head["loss_rel_err"], head["grad_hidden_rel_err"],
                                                     head["grad_weight_rel_err"]) < 1e-5
    assert steps["c_distributed"]["backend"] == "gloo" and steps["c_distributed"]["dcp_async_gb"] > 0
    cases = [c for c in steps["d_throughput"].values() if isinstance(c, dict)]
    assert len(cases) == 4 and all(c["step_s"] > 0 and c["graphs"] >= 1 for c in cases)
    assert steps["e_loop"]["resume_equal"] and len(steps["e_loop"]["losses"]) == 6
    assert steps["e_loop"]["loader_tar_headers_read"] == 0 and steps["e_loop"]["loader_batches_per_s"] > 0
    assert steps["f_sampling"]["ours_tokens_per_s"] > 0
    assert steps["g_scoring"]["images_per_s"] > 0
    assert "refused imports:" in proc.stdout


def test_the_results_table_names_a_cpu_run_and_lists_every_figure():
    from bench.gpu_results import markdown

    data = {"meta": {"device": "cpu", "torch": "2.x", "python": "3.12", "compile_backend": "aot_eager", "total_s": 80.5},
            "steps": {"b_accumulation": {"loss_rel_diff": 0.0, "loss_head": {"speedup": 1.23456}},
                      "d_throughput": {"stage1": {"step_s": 0.5, "graphs": 2}, "stage2": {"step_s": 0.7},
                                       "seconds": 3.0}}}
    text = markdown(data)
    assert "not a GPU result" in text
    assert "| loss_head.speedup | 1.235 |" in text
    assert "| | stage1 | stage2 |" in text and "| step_s | 0.5 | 0.7 |" in text and "| graphs | 2 |  |" in text
    assert "| seconds | 3 |" in text
    data["meta"]["device"] = "NVIDIA H200"
    assert "not a GPU result" not in markdown(data)
