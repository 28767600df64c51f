"""The Triton launcher's plan (safecode_kernels/ops/step_triton.py): what it sends to the
kernels and what it leaves to the torch reference. The compiled variants themselves are
checked in test_triton_compile.py."""

from __future__ import annotations

import pytest
import torch

import safecode_kernels as sk
from safecode_kernels.ops import step_triton

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_UNAVAILABLE = step_triton.unavailable_reason(DEVICE)
requires_triton = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"triton backend unavailable: {_UNAVAILABLE}")


def test_gpu_plan_is_independent_of_the_batch():
    params = sk.SteeringParams(temperature=0.7, top_k=50)
    plans = {step_triton.plan(152_064, 64, params) for _ in range(3)}
    assert len(plans) == 1
    (plan,) = plans
    assert plan.block == step_triton.GPU_BLOCK and plan.fits and plan.x_pad in step_triton.X_SIZES


def test_tiny_temperature_plans_greedy():
    assert step_triton.plan(32_000, 64, sk.SteeringParams(temperature=1e-39, top_p=0.9)).greedy
    assert not step_triton.plan(32_000, 64, sk.SteeringParams(temperature=1e-38, top_p=0.9)).greedy


@pytest.mark.parametrize(
    "vocab, n_ref, fits",
    [(152_064, 150, True), (152_064, 4100, False), (524_288, 10, True), (524_289, 10, False)],
)
def test_what_the_kernels_take(vocab, n_ref, fits):
    """More than NB_MAX blocks, or more refusal ids than the merge's lanes, go to the reference."""
    assert step_triton.plan(vocab, n_ref, sk.SteeringParams()).fits is fits


@requires_triton
def test_step_the_kernels_cannot_take_is_the_references():
    """A refusal set larger than the merge's lanes: the triton backend returns the torch
    reference's tokens, logits and masses."""
    vocab = 5000
    g = torch.Generator().manual_seed(3)
    real = (torch.randn(2, vocab, generator=g) * 3).to(DEVICE)
    noised = (torch.randn(2, vocab, generator=g) * 3).to(DEVICE)
    refusal = torch.arange(0, vocab, 1)[: step_triton.MAX_MERGE_LANES + 10].to(DEVICE)
    params = sk.SteeringParams(scope="all")
    assert not step_triton.plan(vocab, refusal.numel(), params, interpreted=True).fits
    verdict = torch.tensor([1, -1], dtype=torch.int8, device=DEVICE)
    kw = dict(return_logits=True, return_stats=True)
    got = sk.safecode_step(real, noised, verdict, refusal, params, backend="triton", **kw)
    want = sk.safecode_step(real, noised, verdict, refusal, params, backend="torch", **kw)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.logits, want.logits)
    assert torch.equal(got.refusal_mass[0], want.refusal_mass[0])
