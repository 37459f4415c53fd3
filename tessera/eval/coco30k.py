"""The COCO-30k prompt set of LlamaGen's text-to-image evaluation, from the file the user provides.

LlamaGen publishes its 30,000 COCO val2014 captions as a tab-separated file with one `Prompt`
column (evaluations/t2i/coco_captions.csv in its repository) and reads it with pandas. `convert`
reads it the same way and writes the prompt set the eval stage takes (a parquet with a `prompt`
column), in the same order, so that prompt i is the caption LlamaGen's sampler gives image i.

    python -m tessera.eval.coco30k coco_captions.csv prompts/coco30k.parquet
"""
from __future__ import annotations

import argparse
import logging
import posixpath

import pyarrow as pa

from tessera.core.store import ShardStore

COCO30K = 30000
log = logging.getLogger(__name__)


def read_published_csv(path: str) -> list[str]:
    """The captions of LlamaGen's prompt file: tab-separated, a `Prompt` column (a `prompt` or
    `caption` column is taken too)."""
    import fsspec
    import pandas as pd

    with fsspec.open(path, "rb") as f:
        frame = pd.read_csv(f, delimiter="\t")
    column = next((c for c in ("Prompt", "prompt", "caption") if c in frame.columns), None)
    if column is None:
        raise ValueError(f"{path}: no Prompt column (columns: {list(frame.columns)}); expected LlamaGen's "
                         "tab-separated coco_captions.csv")
    captions = frame[column]
    if captions.isna().any():
        raise ValueError(f"{path}: {int(captions.isna().sum())} empty caption(s), first at row "
                         f"{int(captions.isna().to_numpy().nonzero()[0][0])}")
    return [str(c) for c in captions]


def convert(csv_path: str, out: str) -> int:
    """Write the prompt set parquet at `out`; returns the number of prompts."""
    captions = read_published_csv(csv_path)
    if len(captions) != COCO30K:
        log.warning("%s holds %d captions, not the %d of COCO-30k: figures will not be comparable",
                    csv_path, len(captions), COCO30K)
    ShardStore(posixpath.dirname(out) or ".").write_table(pa.table({"prompt": pa.array(captions, pa.string())}),
                                                           posixpath.basename(out))
    return len(captions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="LlamaGen's COCO-30k caption file -> a Tessera prompt set")
    parser.add_argument("csv", help="LlamaGen's evaluations/t2i/coco_captions.csv (local or fsspec URL)")
    parser.add_argument("out", help="the prompt-set parquet to write (set eval.prompts to it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(f"{convert(args.csv, args.out)} prompts -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
