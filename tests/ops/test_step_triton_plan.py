"""The Triton launcher's plan (safecode_kernels/ops/step_triton.py): what it sends to the
kernels (the same plan for any batch and any refusal set) and what it leaves to the torch
reference. The compiled variants themselves are
checked in test_triton_compile.py."""

from __future__ import annotations

import pytest
import torch

import safecode_kernels as sk
from safecode_kernels.ops import step_triton
from safecode_kernels.ops.step_inputs import prepare_step_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_UNAVAILABLE = step_triton.unavailable_reason(DEVICE)
requires_triton = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"triton backend unavailable: {_UNAVAILABLE}")


def test_gpu_plan_is_independent_of_the_batch():
    params = sk.SteeringParams(temperature=0.7, top_k=50)
    plans = {step_triton.plan(152_064, params) for _ in range(3)}
    assert len(plans) == 1
    (plan,) = plans
    assert plan.block == step_triton.GPU_BLOCK and plan.fits and plan.x_pad in step_triton.X_SIZES


@pytest.mark.parametrize("n_ref", [0, 150, 5000, 20_000, 152_064])
def test_gpu_plan_is_independent_of_the_refusal_set(monkeypatch, n_ref):
    """The blocks handle the refusal tokens they hold (from the mask): any refusal set, up to
    the whole vocabulary, gets the plan of an empty one, hence the same compiled kernels."""
    monkeypatch.setattr(step_triton, "_interpreted", lambda: False)  # the GPU heuristics
    vocab = 152_064
    refusal = torch.linspace(0, vocab - 1, n_ref).long().unique()
    for params in (
        sk.SteeringParams(),
        sk.SteeringParams(scope="all"),
        sk.SteeringParams(temperature=1.0, top_p=0.9),
        sk.SteeringParams(temperature=0.6, top_k=20, top_p=0.95),
    ):
        real = torch.zeros(2, vocab, dtype=torch.bfloat16)
        inputs = prepare_step_inputs(real, real, torch.zeros(2, dtype=torch.int8), refusal, params, 0)
        assert inputs.refusal_ids.numel() == refusal.numel()
        got = step_triton._plan(inputs)
        assert got == step_triton.plan(vocab, params) and got.fits


def test_tiny_temperature_plans_greedy():
    assert step_triton.plan(32_000, sk.SteeringParams(temperature=1e-39, top_p=0.9)).greedy
    assert not step_triton.plan(32_000, sk.SteeringParams(temperature=1e-38, top_p=0.9)).greedy


@pytest.mark.parametrize("vocab, fits", [(152_064, True), (524_288, True), (524_289, False)])
def test_what_the_kernels_take(vocab, fits):
    """More than NB_MAX blocks go to the reference; nothing else does."""
    assert step_triton.plan(vocab, sk.SteeringParams()).fits is fits


@requires_triton
def test_step_the_kernels_cannot_take_is_the_references(monkeypatch):
    """A step over more blocks than the merge reads (NB_MAX, lowered here so that the
    interpreter stays fast): the triton backend returns the torch reference's tokens, logits
    and masses, bit for bit."""
    monkeypatch.setattr(step_triton, "NB_MAX", 2)
    monkeypatch.setattr(step_triton, "MAX_BLOCK", 16)
    monkeypatch.setattr(step_triton, "_FORCE_BLOCK", 16)
    vocab = 50
    g = torch.Generator().manual_seed(3)
    real = (torch.randn(2, vocab, generator=g) * 3).to(DEVICE)
    noised = (torch.randn(2, vocab, generator=g) * 3).to(DEVICE)
    refusal = torch.arange(0, vocab, 3).to(DEVICE)
    params = sk.SteeringParams(scope="all")
    assert not step_triton.plan(vocab, params, interpreted=True).fits
    verdict = torch.tensor([1, -1], dtype=torch.int8, device=DEVICE)
    kw = dict(return_logits=True, return_stats=True)
    got = sk.safecode_step(real, noised, verdict, refusal, params, backend="triton", **kw)
    want = sk.safecode_step(real, noised, verdict, refusal, params, backend="torch", **kw)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.logits, want.logits)
    assert torch.equal(got.refusal_mass[0], want.refusal_mass[0])
