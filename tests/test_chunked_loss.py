"""The chunked loss against the plain one (whole fp32 logits, then cross-entropy): the loss and
its gradients, with tolerances from fp32's arithmetic."""
import math

import pytest
import torch
import torch.nn.functional as F

from tessera.models.chunked_loss import chunk_step, chunked_cross_entropy
from tessera.models.gpt import build_gpt
from tessera.training.step import image_loss, token_weights

U = 2.0 ** -24  # fp32's unit roundoff


def gamma(n: int) -> float:
    """The relative error bound of an n-term fp32 sum or dot product: n u / (1 - n u)."""
    return n * U / (1 - n * U)


def _problem(n=300, dim=24, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, dim, generator=g)
    weight = torch.randn(vocab, dim, generator=g) * 0.5
    targets = torch.randint(0, vocab, (n,), generator=g)
    scale = (torch.rand(n, generator=g) > 0.2).float() / n  # some positions do not count
    return h, weight, targets, scale


def _plain(h, weight, targets, scale):
    h, weight = h.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = (F.cross_entropy((h @ weight.t()).float(), targets, reduction="none") * scale).sum()
    loss.backward()
    return loss.detach(), h.grad, weight.grad


def _chunked(h, weight, targets, scale, **kw):
    h, weight = h.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = chunked_cross_entropy(h, weight, targets, scale, **kw)
    loss.backward()
    return loss.detach(), h.grad, weight.grad


def _bounds(h, weight, targets, scale):
    """How far an fp32 computation of the loss and its gradients can be from the exact values.

    A logit is a dim-term dot product: off by at most gamma(dim) |h| |w|. The log-sum-exp is off by
    twice the largest logit error plus gamma(vocab) (its sum of exps) plus a few roundings of its
    own size; the loss sums n such terms (gamma(n) of the sum of their sizes). The softmax moves
    by at most p (exp(2 dz + gamma(vocab)) - 1), so the gradient (p - onehot) scale is off by that
    plus a rounding; the gradients are its matmuls with |w| (vocab terms) and |h| (n terms)."""
    h64, w64, s64 = h.double(), weight.double(), scale.double()
    n, dim = h.shape
    vocab = weight.shape[0]
    logits = h64 @ w64.t()
    dz = gamma(dim) * (h64.abs() @ w64.abs().t()).max(1).values
    lse = torch.logsumexp(logits, 1)
    ce = lse - logits.gather(1, targets[:, None]).squeeze(1)
    per_row = 2 * dz + gamma(vocab) + 4 * U * (lse.abs() + ce.abs())
    loss_bound = (s64 * per_row).sum() + gamma(n) * (s64 * ce).abs().sum()
    p = torch.softmax(logits, 1)
    grad = (p - F.one_hot(targets, vocab).double()) * s64[:, None]
    dgrad = s64[:, None] * (p * torch.expm1(2 * dz + gamma(vocab))[:, None] + 2 * U * (p + 1))
    h_bound = dgrad @ w64.abs() + gamma(vocab) * grad.abs() @ w64.abs()
    w_bound = dgrad.t() @ h64.abs() + gamma(n) * grad.abs().t() @ h64.abs()
    return float(loss_bound), h_bound.float(), w_bound.float()


def _assert_agree(a, b, bounds):
    # Each side is within the bound of the exact values, so within twice it of each other.
    loss_bound, h_bound, w_bound = bounds
    assert abs(float(a[0]) - float(b[0])) <= 2 * loss_bound
    assert torch.all((a[1] - b[1]).abs() <= 2 * h_bound)
    assert torch.all((a[2] - b[2]).abs() <= 2 * w_bound)


@pytest.mark.parametrize("chunk", [1, 64, 299, 300, 4096])
def test_chunked_loss_and_gradients_equal_the_plain_ones(chunk):
    problem = _problem()
    plain, chunked = _plain(*problem), _chunked(*problem, chunk=chunk)
    _assert_agree(plain, chunked, _bounds(*problem))
    assert float(plain[0]) > 0 and plain[2].abs().max() > 0  # a real loss and gradient to compare


def test_the_bounds_are_tight_enough_to_catch_a_wrong_gradient():
    problem = _problem()
    h, weight, targets, scale = problem
    off_by_one = _chunked(h, weight, (targets + 1) % weight.shape[0], scale, chunk=64)
    with pytest.raises(AssertionError):
        _assert_agree(_plain(*problem), off_by_one, _bounds(*problem))


def test_the_compiled_chunk_step_gives_the_same_loss():
    torch._dynamo.reset()
    problem = _problem()
    compiled = torch.compile(chunk_step, backend="aot_eager", dynamic=False)
    _assert_agree(_plain(*problem), _chunked(*problem, chunk=64, step=compiled), _bounds(*problem))


def test_the_models_loss_equals_image_loss_over_its_logits():
    """Through GPT-nano in fp64: the chunked loss inside forward against image_loss over the whole
    logits. Their differences are roundings of fp64 (u = 1.1e-16) through a few hundred terms per
    sum, far below the 1e-10 share of each gradient's size allowed here."""
    torch.manual_seed(0)
    model = build_gpt("GPT-nano", vocab_size=64, token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0,
                      class_dropout=0.0).double()
    torch.nn.init.normal_(model.output.weight, std=0.02)
    model.loss_chunk = 100  # not a divisor of the 2 x 256 positions
    codes = torch.randint(0, 64, (2, 256))
    cond = torch.randn(2, 120, model.cfg.caption_dim, dtype=torch.float64)
    cond_mask = torch.arange(120)[None] >= torch.tensor([[100], [110]])
    valid = torch.tensor([True, False])
    denominator = int(valid.sum()) * 256

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters()}

    plain = grads(image_loss(model(codes[:, :-1], cond, cond_mask), codes, valid, denominator))
    chunked = grads(model(codes[:, :-1], cond, cond_mask, targets=codes,
                          target_weight=token_weights(valid, 256, denominator)))
    assert chunked[0] == pytest.approx(plain[0], rel=1e-12, abs=0)
    for name, g in plain[1].items():
        assert torch.allclose(chunked[1][name], g, rtol=0, atol=1e-10 * float(g.abs().max()) + 1e-300), name
    assert math.isfinite(plain[0]) and plain[1]["output.weight"].abs().max() > 0
