"""Tolerances from the arithmetic, for comparing weights that two orders of fp32 sums trained.

AdamW moves a weight by at most about lr per step, whatever the gradient's size. Reordering fp32
sums (micro-batches instead of one batch, another CPU's kernels) changes a gradient by a few units
in the last place (u = 2**-24), and the normalised update by about that share; only where a
gradient is as small as Adam's eps (1e-8) is the change amplified, up to |change| / eps, which is
still a small share of one step. So every weight agrees within 1% of a step per step taken, and
the bulk (the median) within 1e-4 of one step. Measured on the native (AVX-512) and the
ATEN_CPU_CAPABILITY=default kernel paths: at most 3.4e-4 of a step, median 3e-7 of one.
"""
import torch


def assert_adam_weights_agree(a: dict, b: dict, lr: float, steps: int) -> None:
    assert set(a) == set(b)
    diffs = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    assert diffs.max() <= 0.01 * lr * steps, f"largest difference {float(diffs.max() / lr):.2e} of a step"
    assert diffs.median() <= 1e-4 * lr, f"median difference {float(diffs.median() / lr):.2e} of a step"
