"""The ``cpu`` backend's launcher and kernel paths (safecode_kernels/ops/step_cpu.py,
csrc/): sampling at extreme temperatures and logits against the torch reference, the fast
path of the step against the fully checked one, and the kernel's exact re-check of the
blocks its fast loop flags. The backend-vs-reference grid is in test_step.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import safecode_kernels as sk
from safecode_kernels.ops import step_cpu
from safecode_kernels.ops.dispatch import backend_status
from safecode_kernels.ops.step_inputs import StepError, fast_step_inputs, prepare_step_inputs

CPU_REASON = backend_status()["cpu"]
pytestmark = pytest.mark.skipif(CPU_REASON is not None, reason=f"cpu backend unavailable: {CPU_REASON}")

NO_REFUSAL = torch.tensor([], dtype=torch.int64)
# From 1 down to the smallest float32 denormal; 1/T overflows float32 below about 2.9e-39.
TINY_TEMPERATURES = [1.0, 1e-3, 1e-30, 1e-38, 1e-39, 1e-44, 1.401298464324817e-45]


def _rows(vocab: int, argmax: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(1, vocab, generator=g)
    real[0, argmax] = real.max() + 0.5
    return real, torch.zeros(1, vocab)


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES[2:])
@pytest.mark.parametrize("where", ["middle", "last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_temperature_samples_the_argmax(temperature, where, dtype):
    """A temperature whose inverse overflows behaves as greedy, as in the torch reference."""
    vocab = 1000
    argmax = vocab - 1 if where == "last" else 833
    real, noised = _rows(vocab, argmax)
    real, noised = real.to(dtype), noised.to(dtype)
    params = sk.SteeringParams(temperature=temperature)
    for backend in ("cpu", "torch"):
        for seed in (1, 2):
            assert sk.safecode_step(real, noised, [0], NO_REFUSAL, params, seed, backend).tokens.item() == argmax


@pytest.mark.parametrize("temperature", TINY_TEMPERATURES)
@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (5, 1.0), (0, 0.9)])
def test_temperatures_down_to_the_smallest_denormal_keep_the_top_token(temperature, top_k, top_p):
    """One token far above the rest: every temperature, with or without top-k / top-p, draws it."""
    real, noised = _rows(600, 517, seed=3)
    real[0, 517] = 50.0
    params = sk.SteeringParams(temperature=temperature, top_k=top_k, top_p=top_p)
    for seed in range(3):
        assert sk.safecode_step(real, noised, [1], NO_REFUSAL, params, seed, "cpu").tokens.item() == 517


@pytest.mark.parametrize("top_k", [0, 5])
@pytest.mark.parametrize("noised_like_real", [False, True])
def test_huge_logits_draw_only_the_maximum(top_k, noised_like_real):
    """Logits 3e38 and 3.2e38, temperature 0.5: (z - max) / T gives token 0 the probability 0
    (dividing the unshifted logits would overflow both to inf)."""
    real = torch.zeros(1, 64)
    real[0, 0], real[0, 1] = 3e38, 3.2e38
    noised = real.clone() if noised_like_real else torch.zeros(1, 64)
    params = sk.SteeringParams(temperature=0.5, top_k=top_k)
    for backend in ("cpu", "torch"):
        tokens = {sk.safecode_step(real, noised, [0], NO_REFUSAL, params, s, backend).tokens.item() for s in range(8)}
        assert tokens == {1}, backend


# ---------------------------------------------------------------------------------------
# The fast path of the step against the fully checked one


def _decoder_inputs(batch=3, vocab=1031, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    real = (torch.randn(batch, vocab, generator=g) * 3).to(dtype)
    noised = (0.8 * real.float() + torch.randn(batch, vocab, generator=g)).to(dtype)
    verdict = torch.tensor([(1, -1, 0)[i % 3] for i in range(batch)], dtype=torch.int8)
    refusal = sk.RefusalVocabulary(torch.randperm(vocab, generator=g)[:40].tolist())
    return real, noised, verdict, refusal


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "params", [sk.SteeringParams(), sk.SteeringParams(temperature=0.7, top_k=50, top_p=0.9)], ids=["greedy", "sample"]
)
def test_fast_path_equals_the_checked_path(dtype, params):
    real, noised, verdict, refusal = _decoder_inputs(dtype=dtype)
    assert fast_step_inputs(real, noised, verdict, refusal, params, 5) is not None
    fast = sk.safecode_step(real, noised, verdict, refusal, params, 5, "cpu", return_logits=True, return_stats=True)
    # A list of verdicts and the ids as a tensor take the full checks.
    words = ["unsafe", "safe", "none"]
    assert fast_step_inputs(real, noised, words, refusal.ids, params, 5) is None
    full = sk.safecode_step(real, noised, words, refusal.ids, params, 5, "cpu", return_logits=True, return_stats=True)
    reference = sk.safecode_step(real, noised, words, refusal.ids, params, 5, "torch", return_logits=True)
    assert torch.equal(fast.tokens, full.tokens)
    assert torch.equal(fast.logits, full.logits)
    assert torch.equal(fast.logits, reference.logits)
    assert all(torch.equal(a, b) for a, b in zip(fast.refusal_mass, full.refusal_mass))
    if params.is_greedy:
        assert torch.equal(fast.tokens, reference.tokens)


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_fast_path_creates_no_tensor_but_its_outputs():
    """The decoder's usual call: the only torch op per step is the allocation of the tokens
    (no conversion, no copy, no validation reduction)."""
    real, noised, verdict, refusal = _decoder_inputs()
    params = sk.SteeringParams()
    sk.safecode_step(real, noised, verdict, refusal, params, backend="cpu")  # fills the caches
    with _OpLog() as log:
        out = sk.safecode_step(real, noised, verdict, refusal, params, backend="cpu")
    assert log.ops == ["aten.empty.memory_format"]
    assert out.tokens.shape == (3,)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fast_path_rejects_unknown_verdict_values(backend):
    real, noised, verdict, refusal = _decoder_inputs()
    sk.safecode_step(real, noised, verdict, refusal, backend=backend)
    verdict[1] = 2  # in place, after a checked call: the version counter moved on
    with pytest.raises(ValueError, match="unknown verdict value 2 in row 1"):
        sk.safecode_step(real, noised, verdict, refusal, backend=backend)
    with pytest.raises(ValueError, match="unknown verdict value -5 in row 0"):
        sk.safecode_step(real, noised, torch.tensor([-5, 0, 0], dtype=torch.int8), refusal, backend=backend)


def test_inputs_built_by_hand_take_the_checked_buffers():
    """StepInputs not built by step_inputs' checks never reach the raw-address entry point."""
    real, noised, verdict, refusal = _decoder_inputs()
    inputs = prepare_step_inputs(real, noised, verdict, refusal, sk.SteeringParams(), None)
    by_hand = dataclasses.replace(inputs, kernel_layout=False)
    assert torch.equal(step_cpu.step_cpu(by_hand, False, False)[0], step_cpu.step_cpu(inputs, False, False)[0])
    bad = dataclasses.replace(by_hand, verdict=verdict.to(torch.int64))
    with pytest.raises(ValueError, match="verdict has the wrong item size"):
        step_cpu.step_cpu(bad, False, False)


# ---------------------------------------------------------------------------------------
# The exact re-check of flagged blocks (csrc/contrast_block.h)


@pytest.mark.parametrize("index", [0, 7, 511, 512, 1030])
@pytest.mark.parametrize(
    "real_value,noised_value,message",
    [
        (float("-inf"), float("nan"), "logits_noised row 1 contains NaN"),
        (float("-inf"), float("inf"), "logits_noised row 1 contains NaN or \\+inf"),
        (1.0, float("inf"), "logits_noised row 1 contains NaN or \\+inf"),
        (float("nan"), float("-inf"), "logits_real row 1 contains NaN"),
        (float("inf"), float("-inf"), "logits_real row 1 contains NaN or \\+inf"),
        (-3e38, 3e38, None),  # the contrast overflows to -inf: allowed (the token is banned)
        (float("-inf"), 1.0, None),
    ],
)
def test_flagged_blocks_are_checked_exactly(index, real_value, noised_value, message):
    """Values the fast loop only flags (a -inf contrast) are judged as the torch reference
    judges them, wherever they sit in the block structure (first, tail, block edges)."""
    real, noised, verdict, refusal = _decoder_inputs()
    real[1, index], noised[1, index] = real_value, noised_value
    if message is None:
        out = sk.safecode_step(real, noised, verdict, refusal, backend="cpu", return_logits=True)
        ref = sk.safecode_step(real, noised, verdict, refusal, backend="torch", return_logits=True)
        assert torch.equal(out.tokens, ref.tokens)
        assert torch.equal(out.logits, ref.logits)
        return
    for backend in ("cpu", "torch"):
        with pytest.raises(StepError, match=message):
            sk.safecode_step(real, noised, verdict, refusal, backend=backend)
