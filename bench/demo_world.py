"""The demo's curation stages on its synthetic world, timed one by one, with the truth metrics.

Runs download, score, select, caption and tokenize directly (no Prefect), as the curate flow
calls them, on a config (default configs/demo.yaml), and prints each stage's seconds and the
measured truth: per filter the planted defects caught and clean samples flagged, the captioner's
accuracy and fallbacks, the VQ's reconstruction error.

    python -m bench.demo_world [--dir bench-output/demo-world] [--set KEY=VALUE ...]
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main() -> None:
    from tessera.config import load_config
    from tessera.pipelines import caption, score, select, sources, tokenize
    from tessera.demo import truth
    from tessera.core.store import ShardStore
    from tessera.demo.synthetic import SyntheticSource, truth_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--dir", default="bench-output/demo-world")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--download-only", action="store_true", help="stop after the download")
    args = p.parse_args()
    out = os.path.abspath(args.dir)
    cfg = load_config(args.config, [f"data_root={out}/data", f"models_root={out}/models",
                                    f"source.path={out}/source/laion-synthetic.parquet", *args.overrides])
    store = ShardStore(cfg.data_root)
    seconds = {}
    with SyntheticSource(cfg.source.synthetic, cfg.source.path, cfg.download.timeout):
        t = time.time()
        sources.prepare(cfg.source, cfg.download, store, cfg.ray)
        sources.run(cfg.source, cfg.download, cfg.ray, store)
        seconds["download"] = time.time() - t
    print("seconds per stage:", json.dumps({k: round(v, 1) for k, v in seconds.items()}), flush=True)
    if args.download_only:
        return
    t = time.time()
    score.run(cfg.filters, cfg.ray, store, cfg.models_root)
    seconds["score"] = time.time() - t
    t = time.time()
    select.run(cfg.filters, store)
    filters = truth.measure_filters(store, truth_path(cfg.source.path))
    seconds["select"] = time.time() - t
    t = time.time()
    caption.run(cfg.caption, cfg.ray, store, cfg.models_root)
    seconds["caption"] = time.time() - t
    t = time.time()
    tokenize.run(cfg.tokenize, cfg.ray, store, cfg.models_root)
    seconds["tokenize"] = time.time() - t
    captions = truth.measure_captions(store, truth_path(cfg.source.path))
    tokens = truth.measure_tokenizer(store, score.model_path(cfg.tokenize.vq, cfg.models_root), cfg.tokenize.resolutions)
    print("seconds per stage:", json.dumps({k: round(v, 1) for k, v in seconds.items()}))
    for row in truth.filter_rows(filters):
        print(row)
    print(json.dumps(filters["by_detail"]))
    print(json.dumps(filters["outcome"]))
    print(truth.caption_rows(captions)[0])
    print(truth.tokenizer_rows(tokens))


if __name__ == "__main__":
    main()
