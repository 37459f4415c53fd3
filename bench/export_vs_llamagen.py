"""An exported Tessera model, loaded by LlamaGen's own code, computes what Tessera computes.

The round trip a user makes: a generator in LlamaGen's layout (random weights, a non-zero head)
is fine-tuned by Tessera for a few steps without being told its text mode (it adopts
`llamagen`), `tessera export --optimizer` writes one file, and LlamaGen's model code (imported
from a checkout outside this repository) loads it as its `sample_t2i.py` does. Printed:

- max |logits| difference between LlamaGen's model on the export and Tessera's on its own
  checkpoint (teacher-forced forward, dropout off, left-padded captions), and the greedy codes
  of LlamaGen's `generate` against Tessera's;
- the exported optimizer state, loaded by LlamaGen's `creat_optimizer` AdamW, against Tessera's
  saved state, parameter by parameter;
- what an identity-mode model would have become in LlamaGen's code (the export refuses it).

    python -m bench.export_vs_llamagen --llamagen-src ../LlamaGen [--model GPT-nano] [--res 128]
    (or LLAMAGEN_SRC=../LlamaGen python -m bench.export_vs_llamagen)
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile

import torch

from bench.vs_llamagen import dropout_off, import_llamagen, their_mask


def _left_padded(batch: int, dim: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(batch, 120, dtype=torch.bool)
    for i in range(batch):
        mask[i, 120 - (12 + 29 * i) % 120:] = True
    return torch.randn(batch, 120, dim, generator=g) * mask[..., None], mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llamagen-src", default=os.environ.get("LLAMAGEN_SRC"),
                        help="a LlamaGen checkout outside this repository (default: $LLAMAGEN_SRC)")
    parser.add_argument("--model", default="GPT-nano", help="a Tessera GPT config with 120 text positions")
    parser.add_argument("--res", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="Tessera fine-tuning steps before the export")
    args = parser.parse_args()
    if not args.llamagen_src:
        raise SystemExit("give --llamagen-src or set LLAMAGEN_SRC to a LlamaGen checkout")
    build_theirs, _, their_generate, creat_optimizer = import_llamagen(args.llamagen_src)

    from tessera.config import RunConfig
    from tessera.core.store import ShardStore
    from tessera.demo.codes import write_synthetic_codes
    from tessera.models.gpt import build_gpt
    from tessera.pipelines import train
    from tessera.pipelines.sample import generate as our_generate
    from tessera.pipelines.sample import load_generator
    from tessera.training.checkpoint import ExportRefused, export

    torch.manual_seed(0)
    grid = args.res // 16
    start = build_gpt(args.model, grid=grid, text_rope="llamagen")
    if start.cfg.cls_token_num != 120:
        raise SystemExit(f"{args.model} has {start.cfg.cls_token_num} text positions; LlamaGen's t2i has 120")
    torch.nn.init.normal_(start.output.weight, std=0.02)  # the zero-init head would make logits trivially equal
    cfg_model = start.cfg
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, f"t2i_{args.model}_{args.res}.pt")
        torch.save({"model": start.state_dict(), "steps": 0}, source)  # LlamaGen's layout: no config
        write_synthetic_codes(ShardStore(os.path.join(tmp, "data")), args.res, shards=1, per_shard=4 * args.batch,
                              vocab=cfg_model.vocab_size, caption_dim=cfg_model.caption_dim)
        run_cfg = RunConfig.model_validate({
            "name": "bench", "data_root": os.path.join(tmp, "data"), "runs_root": os.path.join(tmp, "runs"),
            "models_root": tmp, "source": {"path": os.path.join(tmp, "src.parquet")},
            "stage1": {"model": args.model, "init_from": source, "use_ray": False, "global_batch": args.batch,
                       "max_steps": args.steps, "log_every": 1, "data": {"resolution": args.res},
                       "optim": {"lr_per_256": 1.0}}})
        logging.getLogger("tessera").setLevel(logging.WARNING)
        result = train.run(run_cfg, "stage1")
        ours, _ = load_generator(result.checkpoint, None, None)
        print(f"{args.model}, {args.res}px: fine-tuned {result.step} steps from a LlamaGen-layout file; "
              f"adopted text_rope {ours.cfg.text_rope!r}")
        out = export(result.checkpoint, os.path.join(tmp, "export.pt"), optimizer=True)

        # LlamaGen's sample_t2i.py: torch.load, weights under `model`, load_state_dict(strict=False).
        theirs = build_theirs(ours.cfg, grid)
        exported = torch.load(out, map_location="cpu", weights_only=False)
        missing, unexpected = theirs.load_state_dict(exported["model"], strict=False)
        print(f"  LlamaGen loads the export: {len(missing)} missing, {len(unexpected)} unexpected names")

        g = torch.Generator().manual_seed(1)
        cond, cond_mask = _left_padded(args.batch, ours.cfg.caption_dim, g)
        codes = torch.randint(0, ours.cfg.vocab_size, (args.batch, grid * grid), generator=g)
        for m in (ours, theirs):
            m.train()
            dropout_off(m)
        ours.cls_embedding.drop, theirs.cls_embedding.uncond_prob = 0.0, 0.0
        with torch.no_grad():
            a = ours(codes[:, :-1], cond, cond_mask)
            b, _ = theirs(idx=codes[:, :-1], cond_idx=cond, targets=codes, mask=their_mask(cond_mask, grid * grid))
        print(f"  logits: max |Tessera - LlamaGen on the export| = {(a - b).abs().max().item():.2e} "
              f"(logits' own scale {a.abs().max().item():.2e}, shape {tuple(a.shape)})")

        ours.eval()
        theirs.eval()
        with torch.no_grad():
            mine = our_generate(ours, cond[:1], cond_mask[:1], cfg_scale=4.0, temperature=1.0, top_k=1, top_p=1.0)
            theirs_codes = their_generate(theirs, cond[:1], grid * grid, emb_masks=cond_mask[:1], cfg_scale=4.0,
                                          temperature=1.0, top_k=1, top_p=1.0, sample_logits=True)
        same = (mine.view(-1) == theirs_codes.view(-1)).float().mean().item()
        print(f"  greedy sampling with CFG 4: {100 * same:.1f}% of {grid * grid} codes equal")

        if creat_optimizer is not None:
            their_opt = creat_optimizer(theirs, 0.05, 1e-4, (0.9, 0.95), logging.getLogger("llamagen"))
            their_opt.load_state_dict(exported["optimizer"])
            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

            dcp_to_torch_save(result.checkpoint, os.path.join(tmp, "full.pt"))
            saved = torch.load(os.path.join(tmp, "full.pt"), weights_only=True)["optim"]["state"]
            worst = max((their_opt.state[p]["exp_avg_sq"] - saved[n]["exp_avg_sq"]).abs().max().item()
                        + (their_opt.state[p]["exp_avg"] - saved[n]["exp_avg"]).abs().max().item()
                        for n, p in theirs.named_parameters())
            print(f"  optimizer: LlamaGen's AdamW takes the exported state; max |moment difference| by name "
                  f"= {worst:.2e} over {len(list(theirs.parameters()))} parameters, steps {exported['steps']}")
        else:
            print("  optimizer: LlamaGen's creat_optimizer could not be imported (its training packages are missing)")

        # An identity-mode model: refused, and what LlamaGen's code would have made of its weights.
        run_cfg.stage1.init_from, run_cfg.stage1.text_rope = None, "identity"
        identity = train.run(run_cfg, "stage1", run_name="identity")
        try:
            export(identity.checkpoint, os.path.join(tmp, "identity.pt"))
            print("  identity-mode export: written (unexpected)")
        except ExportRefused as e:
            print(f"  identity-mode export refused: {e}")
        ident, _ = load_generator(identity.checkpoint, None, None)
        torch.nn.init.normal_(ident.output.weight, std=0.02)
        theirs = build_theirs(ident.cfg, grid)  # a fresh one: generate left caches in the other
        theirs.load_state_dict(ident.state_dict(), strict=False)
        for m in (ident, theirs):
            m.train()
            dropout_off(m)
        ident.cls_embedding.drop, theirs.cls_embedding.uncond_prob = 0.0, 0.0
        with torch.no_grad():
            a = ident(codes[:, :-1], cond, cond_mask)
            b, _ = theirs(idx=codes[:, :-1], cond_idx=cond, targets=codes, mask=their_mask(cond_mask, grid * grid))
        print(f"  had it been written, LlamaGen's logits would differ by up to {(a - b).abs().max().item():.2e} "
              f"(logits' scale {a.abs().max().item():.2e})")


if __name__ == "__main__":
    main()
