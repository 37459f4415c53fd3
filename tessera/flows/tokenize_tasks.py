"""Prefect task of the curate flow's last step: pre-tokenization into code shards."""
from __future__ import annotations

from prefect import task

from tessera.config import RunConfig
from tessera.flows.common import RETRIES, ShardProgress, logger, publish_table
from tessera.pipelines import tokenize
from tessera.core.store import ShardStore
from tessera.core.token_shards import tokens_folder

@task(name="tokenize", **RETRIES)
def tokenize_task(cfg: RunConfig, store: ShardStore) -> tokenize.TokenizeResult:
    shards = tokenize.input_shards(store)
    result = tokenize.run(cfg.tokenize, cfg.ray, store, cfg.models_root,
                          on_shard=ShardProgress("tokenize", shards, store))
    rows = []
    for res in cfg.tokenize.resolutions:
        m = store.read_json(tokens_folder(res), "manifest.json")
        rows.append({"resolution": res, "samples": m["samples"], "bytes_per_sample": m["bytes_per_sample"],
                     "codes_used": m["codes_used"], "codebook_usage": m["codebook_usage"],
                     "dropped": ", ".join(f"{n} {r}" for r, n in sorted(m["dropped"].items())) or "none"})
        logger().info("Tokenized %d samples at %d px into %s (%s bytes each, %d of %s codes used); dropped %s.",
                      m["samples"], res, store.url(tokens_folder(res)), m["bytes_per_sample"],
                      m["codes_used"], m["codebook_size"], rows[-1]["dropped"])
    publish_table("tokens", rows, "Code shards per resolution (tokens/{res}/manifest.json).")
    return result
