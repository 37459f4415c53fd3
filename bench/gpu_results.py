"""A Markdown table of a gpu_validate.json, for bench/results/.

    python -m bench.gpu_results gpu-validate/gpu_validate.json > bench/results/NAME.md

One table per step: every figure the step recorded (nested ones by their path), numbers to four
significant digits; d_throughput with one column per case.
"""
from __future__ import annotations

import argparse
import json


def fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "null"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(fmt(v) for v in value)
    return str(value).replace("|", "\\|")


def flatten(row: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def cases_table(cases: dict) -> list[str]:
    names = [n for n, v in cases.items() if isinstance(v, dict)]
    keys = list(dict.fromkeys(k for n in names for k in cases[n]))
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {k} | " + " | ".join(fmt(cases[n].get(k, "")) for n in names) + " |" for k in keys]
    rest = {k: v for k, v in cases.items() if not isinstance(v, dict)}
    return lines + ([""] + pairs_table(rest) if rest else [])


def pairs_table(row: dict) -> list[str]:
    return ["| figure | value |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in flatten(row).items()]


def markdown(data: dict) -> str:
    meta = data["meta"]
    lines = ["# bench.gpu_validate results", ""]
    if meta.get("device") == "cpu":
        lines += ["**A CPU run with tiny models (`--device cpu --tiny`), not a GPU result.** It shows that every "
                  "step runs end to end and that its checks hold on tiny shapes; its timings are those of a "
                  "shared CPU and say nothing about a GPU.", ""]
    lines += [f"Device {meta.get('device')}, torch {meta.get('torch')}, Python {meta.get('python')}, compile backend "
              f"{meta.get('compile_backend')}, {fmt(meta.get('total_s'))} s in all.", ""]
    for name, row in data["steps"].items():
        lines += [f"## {name}", ""]
        lines += cases_table(row) if name == "d_throughput" else pairs_table(row)
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a gpu_validate.json")
    args = parser.parse_args()
    with open(args.results) as f:
        print(markdown(json.load(f)), end="")


if __name__ == "__main__":
    main()
