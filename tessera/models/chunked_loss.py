"""Cross-entropy of the output head, chunk by chunk: the fp32 logits of the whole sequence never exist.

The plain way (`output(h).float()`, then cross-entropy) keeps the (positions x vocabulary) fp32
logits, their softmax and its gradient alive at once: about 3 GiB for GPT-XL at micro-batch 16
and 512px. Here the forward pass runs the head over `chunk` positions at a time and computes,
for that chunk, the loss and its gradients with respect to the hidden states and the head's
weight right away (the gradient of cross-entropy is softmax minus the one-hot target, so
nothing else is needed). Only those gradients are kept for the backward pass, which scales them.

`chunk_step` is a pure function of tensors: `torch.compile` fuses its softmax, one-hot and scaling
into the matmuls' neighbours. Positions are padded to a whole number of chunks (padding rows
weigh 0), so every chunk has the same shape and compiles once. Memory: two fp32 (chunk x vocabulary)
tensors at a time (the logits, then their softmax, turned into the gradient in place), plus the
gradients kept for the backward pass: h's size (in place of h, which the head would keep) and the
head's weight in fp32.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in fp32, or as it is when it is wider (fp64 models, for exact comparisons)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def chunk_step(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
               scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For one chunk of positions: sum(scale x cross-entropy), its gradient with respect to h
    (h's dtype) and to the head's weight (fp32). h and weight are in the dtype of the matmul; the
    softmax and sums are in fp32 (fp64 for an fp64 model)."""
    logits = at_least_fp32(h @ weight.t())
    lse = torch.logsumexp(logits, dim=-1)
    loss = ((lse - logits.gather(1, targets[:, None]).squeeze(1)) * scale).sum()
    # In place from here: two (chunk x vocab) fp32 tensors at most, the logits and their softmax.
    grad = logits.sub(lse[:, None]).exp_()
    del logits
    grad.scatter_add_(1, targets[:, None], torch.full_like(lse[:, None], -1.0))  # minus the one-hot
    grad = grad.mul_(scale[:, None]).to(h.dtype)
    return loss, grad @ weight, at_least_fp32(grad.t() @ h)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, scale, chunk: int, step: Callable):
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        n = h.shape[0]
        chunk = min(chunk, n)
        padded = -(-n // chunk) * chunk
        with torch.autocast(device, enabled=False):
            hc = F.pad(h.to(dtype), (0, 0, 0, padded - n))
            wc = weight.to(dtype)
            targets = F.pad(targets, (0, padded - n))
            acc = torch.promote_types(dtype, torch.float32)
            scale = F.pad(scale.to(acc), (0, padded - n))
            loss = torch.zeros((), dtype=acc, device=h.device)
            grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device)
            grads_h = []
            for start in range(0, padded, chunk):
                part = slice(start, start + chunk)
                chunk_loss, grad_h, chunk_grad_w = step(hc[part], wc, targets[part], scale[part])
                loss += chunk_loss
                grad_w += chunk_grad_w
                grads_h.append(grad_h)
        ctx.save_for_backward(torch.cat(grads_h)[:n].to(h.dtype), grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss.to(grad_w.dtype), None, None, None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor,
                          chunk: int = 8192, step: Callable = chunk_step) -> torch.Tensor:
    """sum over positions of scale x cross-entropy(h @ weight.T, targets), in fp32.

    h: (N, dim) hidden states; weight: (vocab, dim), the head's; targets: (N,) int64; scale: (N,)
    each position's weight in the loss (0: not counted). Under autocast the head's matmul runs in
    the autocast dtype, as `nn.Linear` would. `step`: `chunk_step` or a compiled copy of it."""
    if chunk < 1:
        raise ValueError(f"the loss chunk must be at least one position, not {chunk}")
    return _ChunkedCrossEntropy.apply(h, weight, targets, scale, chunk, step)
