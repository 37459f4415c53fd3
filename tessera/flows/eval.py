"""Prefect flow `eval`: a thin wrapper over tessera.pipelines.evaluate.

Samples the prompt set from each checkpoint on Ray, prints and publishes the comparison table
(untrained / stage 1 / stage 2 and any checkpoint paths) and the tokenizer's figures, and links
the samples page. Rerunning skips every finished shard.
"""
from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from tessera.config import load_config
from tessera.core.store import viewable_link
from tessera.flows.common import RETRY_ONCE, logger, publish_table
from tessera.pipelines import evaluate

# Columns of the comparison table, in order (those a run does not have are left out).
COLUMNS = ("label", "step", "protocol", "resolution", "eval_resolution", "n_gen", "n_ref", "images",
           "prompt_following", "prompt_following_chance", "prompt_following_color", "prompt_following_color_chance",
           "prompt_following_shape", "prompt_following_shape_chance", "prompt_following_place",
           "prompt_following_place_chance", "prompt_following_background", "prompt_following_background_chance",
           "clip_score", "clip_feature_frechet", "fid",
           "inception_score", "precision", "recall", "tokens_per_s", "seconds", "fid_error", "warning")
TOKENIZER_COLUMNS = ("resolution", "images", "rfid", "rfid_clip_features", "psnr", "ssim", "codebook_usage", "usage_cap",
                     "codes_counted")


def table(rows: list[dict], columns: tuple[str, ...]) -> list[dict]:
    present = [c for c in columns if any(c in r for r in rows)]
    return [{c: (round(r[c], 4) if isinstance(r.get(c), float) else r.get(c)) for c in present} for r in rows]


def as_text(rows: list[dict]) -> str:
    if not rows:
        return "(nothing)"
    cols = list(rows[0])
    cells = [[str(c) for c in cols]] + [["" if r[c] is None else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells)


@task(name="evaluate", **RETRY_ONCE)
def evaluate_task(config: str, overrides: list[str], run: str | None, checkpoints: list[str] | None,
                  tokenizer: bool) -> evaluate.EvalResult:
    return evaluate.run(load_config(config, overrides), run_name=run, checkpoints=checkpoints, tokenizer=tokenizer)


@flow(name="eval", log_prints=True)
def eval_flow(config: str, overrides: list[str] | None = None, run: str | None = None,
              checkpoints: list[str] | None = None, tokenizer: bool = True) -> dict:
    """Evaluate checkpoints (default: the config's eval.checkpoints) and the tokenizer; returns the figures."""
    overrides = list(overrides or [])
    result = evaluate_task(config, overrides, run, checkpoints, tokenizer)
    rows = table(result.history, COLUMNS)  # every checkpoint evaluated so far in this run
    print(f"Evaluation ({result.metrics_file}):\n{as_text(rows)}")
    if rows:
        publish_table("eval-checkpoints", rows, "Generator checkpoints compared: prompt-following, CLIP score, "
                      "the CLIP-feature Frechet distance (not FID) and FID when Inception weights are given.")
    if result.tokenizer:
        tok = table(result.tokenizer, TOKENIZER_COLUMNS)
        print(f"Tokenizer (reconstruction of held-out images):\n{as_text(tok)}")
        publish_table("eval-tokenizer", tok, "The VQ tokenizer on held-out images: rFID, PSNR, SSIM, codebook usage.")
    if result.page:
        create_markdown_artifact(key="eval-samples", description="Samples grouped by prompt.",
                                 markdown=(f"Samples by prompt: [{result.page}]({viewable_link(result.page)})\n\n"
                                           f"metrics: [{result.metrics_file}]({viewable_link(result.metrics_file)})"))
    if result.failed:
        logger().error("eval: failed shards: %s", {k: sorted(v) for k, v in result.failed.items()})
        raise RuntimeError(f"eval: shards failed for {', '.join(result.failed)}; rerun to redo only those")
    return {"rows": result.rows, "tokenizer": result.tokenizer, "page": result.page,
            "metrics_file": result.metrics_file}
