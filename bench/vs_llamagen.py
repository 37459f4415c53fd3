"""Side by side with LlamaGen's own model code: a training step and sampling, same weights and inputs.

LlamaGen is read from a checkout outside this repository (`--llamagen-src DIR`) and imported at
run time; nothing of it is copied here. Both sides get the same GPT weights (our state dict loads
strictly into theirs: the names are theirs) with `text_rope: llamagen`, the same images, caption
features and optimizer settings.

- Their training step, as their t2i script runs it: VQ-encode the images, their explicit
  (B, 1, L, L) mask, forward with targets, backward, grad clip, AdamW (their `creat_optimizer`).
- Ours: from the stored codes of the same images (the tokenize stage ran the VQ once), the
  padding-aware mask built inside the model, the same loss, backward, clip, AdamW.
- Sampling: their `generate` against ours, CFG, same caption features, greedy decoding; both warmed
  up, then the median of interleaved repeats, and a check that both chose the same tokens.
Before timing, the logits of both models on the same inputs are compared (dropout off).

    python -m bench.vs_llamagen --llamagen-src ../LlamaGen [--model GPT-B] [--res 256] [--batch 2]
                                [--steps 3] [--device cpu|cuda] [--sample-batch 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from tessera.config.train import TrainConfig
from tessera.models.gpt import build_gpt
from tessera.models.generation import generate as our_generate
from tessera.training.step import build_optimizer, train_step


def import_llamagen(src: str):
    """Their GPT builder, VQ models, generate and optimizer, from a checkout at `src`."""
    if not os.path.isdir(os.path.join(src, "autoregressive")):
        raise SystemExit(f"--llamagen-src {src!r} is not a LlamaGen checkout (no autoregressive/ folder)")
    sys.path.insert(0, os.path.abspath(src))
    from autoregressive.models.generate import generate
    from autoregressive.models.gpt import ModelArgs, Transformer
    from tokenizer.tokenizer_image.vq_model import VQ_models
    try:
        from autoregressive.train.train_c2i import creat_optimizer
    except ImportError:  # their training script needs packages the model does not
        creat_optimizer = None

    def build(cfg, grid: int):
        """Their t2i Transformer with the dimensions of our GPTConfig (their GPT-B/XL... for ours)."""
        return Transformer(ModelArgs(dim=cfg.dim, n_layer=cfg.n_layer, n_head=cfg.n_head, multiple_of=cfg.multiple_of,
                                     vocab_size=cfg.vocab_size, caption_dim=cfg.caption_dim, cls_token_num=120,
                                     block_size=grid * grid, model_type="t2i"))
    return build, VQ_models, generate, creat_optimizer


def their_mask(cond_mask: torch.Tensor, n_image: int) -> torch.Tensor:
    """The mask their t2i dataset builds per sample: causal, padded text columns hidden, the
    diagonal always on; (B, 1, L, L) bool over L = 120 + image tokens, cut to L-1 by the script."""
    b, t = cond_mask.shape
    length = t + n_image
    mask = torch.tril(torch.ones(length, length)).expand(b, length, length).clone()
    mask[:, :, :t] *= cond_mask[:, None, :].float()
    eye = torch.eye(length)
    mask = mask * (1 - eye) + eye
    return mask.to(torch.bool)[:, None, :-1, :-1]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def dropout_off(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llamagen-src", required=True, help="a LlamaGen checkout (outside this repository)")
    parser.add_argument("--model", default="GPT-B")
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side (interleaved)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--sample-batch", type=int, default=1, help="images per sampling run (0: skip sampling)")
    parser.add_argument("--sample-repeats", type=int, default=3, help="timed sampling runs per side, after a warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    build_theirs, VQ_models, their_generate, creat_optimizer = import_llamagen(args.llamagen_src)

    grid = args.res // 16
    n_image = grid * grid
    torch.manual_seed(0)
    ours = build_gpt(args.model, grid=grid, device=device, text_rope="llamagen")
    torch.nn.init.normal_(ours.output.weight, std=0.02)  # the zero-init head would make logits trivially equal
    theirs = build_theirs(ours.cfg, grid).to(device)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    vq = VQ_models["VQ-16"](codebook_size=16384, codebook_embed_dim=8).to(device).eval()  # random weights

    # The same inputs: images, left-padded caption features of different lengths.
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(args.batch, 3, args.res, args.res, generator=g) * 2 - 1).to(device)
    cond = torch.randn(args.batch, 120, ours.cfg.caption_dim, generator=g).to(device)
    cond_mask = torch.zeros(args.batch, 120, dtype=torch.bool)
    for i in range(args.batch):
        cond_mask[i, 120 - (20 + 37 * i) % 120:] = True
    cond = cond * cond_mask[..., None].to(device)
    cond_mask = cond_mask.to(device)
    valid = torch.ones(args.batch, dtype=torch.bool, device=device)
    with torch.no_grad():
        codes = vq.encode(images)[2][2].reshape(args.batch, -1)  # the tokenize stage's codes

    # Logits, dropout off, training-mode forward on both sides.
    for m in (ours, theirs):
        m.train()
        dropout_off(m)
    ours.cls_embedding.drop, theirs.cls_embedding.uncond_prob = 0.0, 0.0
    with torch.no_grad():
        a = ours(codes[:, :-1], cond, cond_mask)
        b, _ = theirs(idx=codes[:, :-1], cond_idx=cond, targets=codes, mask=their_mask(cond_mask.cpu(), n_image).to(device),
                      valid=valid)
    diff = (a - b).abs().max().item()
    print(f"logits: max |ours - theirs| = {diff:.2e} over {tuple(a.shape)} (text_rope llamagen, dropout off)")
    if not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
        raise SystemExit("the logits differ: the models are not the same")
    ours.cls_embedding.drop, theirs.cls_embedding.uncond_prob = 0.1, 0.1
    for m in (ours, theirs):
        for d in m.modules():
            if isinstance(d, torch.nn.Dropout):
                d.p = 0.1

    # Training steps, interleaved so both sides see the same machine load.
    cfg = TrainConfig(model=args.model, global_batch=args.batch)
    our_opt = build_optimizer(ours, cfg, device)
    lr, betas = our_opt.defaults["lr"], our_opt.defaults["betas"]
    if creat_optimizer is not None:
        import logging

        their_opt = creat_optimizer(theirs, 0.05, lr, betas, logging.getLogger("llamagen"))
    else:
        their_opt = torch.optim.AdamW(
            [{"params": [p for p in theirs.parameters() if p.dim() >= 2], "weight_decay": 0.05},
             {"params": [p for p in theirs.parameters() if p.dim() < 2], "weight_decay": 0.0}],
            lr=lr, betas=betas, fused=True)
    our_batch = [{"codes": codes.cpu(), "cond": cond.cpu(), "cond_mask": cond_mask.cpu(), "valid": valid.cpu()}]
    autocast = torch.bfloat16 if device.type == "cuda" else None
    mask_cpu = cond_mask.cpu()

    def their_step() -> None:
        theirs.train()
        start = time.perf_counter()
        with torch.no_grad():
            x = vq.encode(images)[2][2].reshape(args.batch, -1)
        sync(device)
        vq_times.append(time.perf_counter() - start)
        mask = their_mask(mask_cpu, n_image).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            _, loss = theirs(idx=x[:, :-1], cond_idx=cond, targets=x, mask=mask, valid=valid)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        their_opt.step()
        their_opt.zero_grad(set_to_none=True)

    def our_step() -> None:
        train_step(ours, our_opt, our_batch, device=device, autocast_dtype=autocast)

    times = {"ours": [], "theirs": []}
    vq_times: list[float] = []
    for i in range(args.warmup + args.steps):
        for name, fn in (("theirs", their_step), ("ours", our_step)):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t_ours, t_theirs = statistics.median(times["ours"]), statistics.median(times["theirs"])
    print(f"{args.model}, {args.res}px, batch {args.batch}, {device}, {torch.get_num_threads()} threads, "
          f"load average {load:.1f}")
    t_vq = statistics.median(vq_times[args.warmup:])
    print(f"  training step, LlamaGen (VQ encode + GPT): {t_theirs:7.2f} s   (median of {args.steps})")
    print(f"    of which the VQ encode:                  {t_vq:7.2f} s")
    print(f"  training step, Tessera (from codes):       {t_ours:7.2f} s")
    print(f"  ratio: {t_theirs / t_ours:.2f}x (GPT step alone: {(t_theirs - t_vq) / t_ours:.2f}x)")

    if args.sample_batch:
        sample_side_by_side(ours, theirs, their_generate, cond[:args.sample_batch], cond_mask[:args.sample_batch],
                            n_image, args.sample_repeats, device)


def sample_side_by_side(ours, theirs, their_generate, cond, cond_mask, n_image: int, repeats: int,
                        device: torch.device) -> dict:
    """Greedy CFG sampling on both sides: one warm-up each, then `repeats` interleaved runs; the
    median tokens/s of each, and whether the two picked the same tokens."""
    theirs.load_state_dict(ours.state_dict(), strict=True)  # the training steps above moved them apart
    ours.eval()
    theirs.eval()
    n = len(cond) * n_image

    def run_ours():
        return our_generate(ours, cond, cond_mask, cfg_scale=7.5, temperature=0.0)

    def run_theirs():
        return their_generate(theirs, cond, n_image, emb_masks=cond_mask, cfg_scale=7.5, top_k=0,
                              sample_logits=False).long()

    times = {"ours": [], "theirs": []}
    tokens = {}
    for i in range(1 + repeats):  # the first round warms both up
        for name, fn in (("theirs", run_theirs), ("ours", run_ours)):
            sync(device)
            start = time.perf_counter()
            tokens[name] = fn()
            sync(device)
            if i:
                times[name].append(time.perf_counter() - start)
    t_ours, t_theirs = statistics.median(times["ours"]), statistics.median(times["theirs"])
    same = torch.equal(tokens["ours"].cpu(), tokens["theirs"].cpu())
    agree = float((tokens["ours"].cpu() == tokens["theirs"].cpu()).float().mean())
    print(f"  sampling {len(cond)} image(s) x {n_image} tokens, greedy, CFG 7.5, median of {repeats} after a warm-up:")
    print(f"    LlamaGen {n / t_theirs:7.1f} tokens/s, Tessera {n / t_ours:7.1f} tokens/s, ratio {t_theirs / t_ours:.2f}x")
    print(f"    tokens identical: {same} ({agree:.1%} agree)")
    return {"ours_tokens_per_s": n / t_ours, "llamagen_tokens_per_s": n / t_theirs, "ratio": t_theirs / t_ours,
            "tokens_identical": same, "tokens_agree": agree}

if __name__ == "__main__":
    main()
