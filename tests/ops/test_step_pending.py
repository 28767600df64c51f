"""The step op launched without a host read (``ops/step_pending.py``) against ``safecode_step``:
the same tokens, logits and masses, and the same errors once the status words are read."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import safecode_kernels as sk
from safecode_kernels import RefusalVocabulary, SteeringParams, StepError
from safecode_kernels.ops import step_cpu, step_triton
from safecode_kernels.ops.codes import FALLBACK_FLAG
from safecode_kernels.ops.step_inputs import prepare_step_inputs
from safecode_kernels.ops.step_pending import PendingStep, finish_step, launch_step

BACKENDS = [
    "torch",
    pytest.param("cpu", marks=pytest.mark.skipif(step_cpu.unavailable_reason() is not None, reason="no C++ kernel")),
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            step_triton.unavailable_reason(torch.device("cpu")) is not None, reason="no Triton interpreter"
        ),
    ),
]
GREEDY = SteeringParams(sensitive_top_k=10)
SAMPLED = GREEDY.replace(temperature=0.7, top_p=0.9)
VOCAB = 64


# A host read of a value shows as exactly one of these: ``_local_scalar_dense`` normally,
# ``is_nonzero`` / ``item`` under inference mode (which skips their decomposition).
_READ_OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default)


class HostReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value on the host (``bool(t)``, ``int(t)``, ``.item()``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READ_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    real, noised = torch.randn(batch, VOCAB, generator=g), torch.randn(batch, VOCAB, generator=g)
    verdict = torch.tensor([1, -1, 0, 1, -1][:batch], dtype=torch.int8)
    return real, noised, verdict, RefusalVocabulary([2, 5, 11, 40])


def _read(pending: PendingStep):
    return None if pending.status is None else pending.status.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_same_answer_as_the_public_op(backend, params):
    real, noised, verdict, refusal = _inputs()
    want = sk.safecode_step(real, noised, verdict, refusal, params, 7, backend, return_logits=True, return_stats=True)
    pending = launch_step(real, noised, verdict, refusal, params, 7, backend, True, True)
    tokens, logits, (before, after) = finish_step(pending, _read(pending))
    assert torch.equal(tokens, want.tokens)
    torch.testing.assert_close(logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(before, want.refusal_mass[0], rtol=0, atol=0)
    torch.testing.assert_close(after, want.refusal_mass[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize(
    "row, branch, value, message",
    [
        (1, 0, float("nan"), "logits_real row 1 contains NaN"),
        (2, 1, float("inf"), "logits_noised row 2 contains NaN or \\+inf"),
        (0, 0, float("-inf"), "row 0: every token is banned after the contrast"),
    ],
)
def test_errors_wait_for_the_status_words(backend, params, row, branch, value, message):
    """Nothing is raised at launch (a sampled row of NaN does not reach multinomial); the
    words read then raise exactly what ``safecode_step`` raises."""
    real, noised, verdict, refusal = _inputs()
    (real, noised)[branch][row] = value
    with pytest.raises(StepError, match=message):
        sk.safecode_step(real, noised, verdict, refusal, params, 7, backend)
    pending = launch_step(real, noised, verdict, refusal, params, 7, backend, False, True)
    words = _read(pending)
    assert words is not None and words[row] != 0
    with pytest.raises(StepError, match=message):
        finish_step(pending, words)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_no_host_read_at_launch_on_the_torch_backend(params):
    """The public op reads the verdicts' values and each check's result on the host; the
    launch reads nothing (the seed of a sampled step is drawn from the CPU generator before)."""
    real, noised, verdict, refusal = _inputs()
    seed = 123  # an int seed: no draw from a generator
    launch_step(real, noised, verdict, refusal, params, seed, "torch", True, True)  # the set's mask, built once
    with HostReads() as reads:
        launch_step(real, noised, verdict, refusal, params, seed, "torch", True, True)
    assert reads.count == 0
    with HostReads() as reads:
        sk.safecode_step(real, noised, verdict, refusal, params, seed, "torch", return_stats=True)
    assert reads.count > 0  # what the launch avoids


def test_rows_flagged_for_fallback_are_recomputed_exactly():
    """Rows whose word carries ``FALLBACK_FLAG`` (the Triton merge could not decide them) come
    from the torch reference; the others keep the launched values."""
    real, noised, verdict, refusal = _inputs(batch=4)
    params = GREEDY
    want = sk.safecode_step(real, noised, verdict, refusal, params, None, "torch", True, True)
    inputs = prepare_step_inputs(real, noised, verdict, refusal, params, None)
    tokens, logits = want.tokens.clone(), want.logits.clone()
    stats = tuple(m.clone() for m in want.refusal_mass)
    tokens[2], logits[2], stats[0][2], stats[1][2] = 63 - int(tokens[2]), 0.0, -1.0, -1.0  # what a row left undecided
    pending = PendingStep(inputs, tokens, logits, stats, torch.tensor([0, 0, FALLBACK_FLAG, 0]), True, True)
    got_tokens, got_logits, (before, after) = finish_step(pending, [0, 0, FALLBACK_FLAG, 0])
    assert torch.equal(got_tokens, want.tokens)
    torch.testing.assert_close(got_logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(before, want.refusal_mass[0], rtol=0, atol=0)
    torch.testing.assert_close(after, want.refusal_mass[1], rtol=0, atol=0)
