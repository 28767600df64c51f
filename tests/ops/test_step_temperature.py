"""Sampling is exact for any temperature and logit range, on every backend (docs/design.md §2).

The reference scales ``(z' - max z') / T``: huge finite logits over a temperature below 1
must not overflow to inf (which would give token 0, of probability 0, or NaN), and a
temperature so small that ``1 / T`` overflows float32 decodes greedily
(``step_torch.decodes_greedily``). The Triton backend runs in its interpreter without a GPU:
few, small calls.
"""

from __future__ import annotations

import pytest
import torch

import safecode_kernels as sk
from safecode_kernels.ops.dispatch import backend_status
from safecode_kernels.ops.step_torch import decodes_greedily

_STATUS = backend_status()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
requires_cpu = pytest.mark.skipif(_STATUS["cpu"] is not None, reason=f"cpu backend unavailable: {_STATUS['cpu']}")
requires_triton = pytest.mark.skipif(
    _STATUS["triton"] is not None, reason=f"triton backend unavailable: {_STATUS['triton']}"
)
# The C++ kernel multiplies by 1 / T, inf for a denormal T (0 * inf at the max: NaN), and
# samples rather than taking the argmax there: these cases fail until it decides greedy as
# step_torch.decodes_greedily does.
BACKENDS = [
    "torch",
    pytest.param("cpu", marks=requires_cpu),
    pytest.param("triton", marks=requires_triton),
]


MODES = {  # top_k, top_p
    "T": (0, 1.0),
    "T-top-k5": (5, 1.0),
    "T-top-p": (0, 0.9),
    "T-top-k5-top-p": (5, 0.9),
}


def _step(backend, real, params, refusal=(), generator=0):
    device = DEVICE if backend == "triton" else torch.device("cpu")
    real = real.to(device)
    verdict = torch.ones(real.shape[0], dtype=torch.int8, device=device)
    return sk.safecode_step(
        real, torch.zeros_like(real), verdict, list(refusal), params, generator=generator, backend=backend
    ).tokens.cpu()


def _huge_rows(vocab=22):
    """Row 0: 3e38 at index 0 and 3.2e38 at index 1; row 1: the same with the max at the last
    index. Both other tokens are at 0: after the shift they are -3.2e38 / T, probability 0."""
    real = torch.zeros(2, vocab)
    real[0, 0], real[0, 1] = 3.0e38, 3.2e38
    real[1, 0], real[1, -1] = 3.0e38, 3.2e38
    return real


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_huge_logits_sample_the_maximum(backend, mode):
    """Token 1 (row 0) and the last token (row 1) have probability 1 at T = 0.5: token 0,
    whose logit 3e38 / 0.5 overflows to inf like the max's, has probability 0."""
    top_k, top_p = MODES[mode]
    real = _huge_rows()
    for sensitive_top_k in (0, 20):  # without and with the blocks' candidates
        params = sk.SteeringParams(
            alpha=0.0, temperature=0.5, top_k=top_k, top_p=top_p, sensitive_top_k=sensitive_top_k
        )
        for seed in (0, 1):
            got = _step(backend, real, params, generator=seed).tolist()
            assert got == [1, real.shape[1] - 1], (sensitive_top_k, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits_with_refusal_bias(backend):
    """The bias moves a huge refusal logit: the max after the bias decides (scope "all")."""
    real = _huge_rows()
    params = sk.SteeringParams(alpha=0.0, temperature=0.5, scope="all", boost=1.0e37, sensitive_top_k=0)
    # Token 0 is a refusal token: 3e38 + 1e37 is still below 3.2e38 in row 0 and row 1.
    assert _step(backend, real, params, refusal=[0]).tolist() == [1, real.shape[1] - 1]
    # 3e38 + 3e37 now exceeds 3.2e38: token 0 is certain in both rows.
    assert _step(backend, real, params.replace(boost=3.0e37), refusal=[0]).tolist() == [0, 0]


# From 1 down to the smallest float32 denormal (1.4e-45), and one below it that rounds to 0.
TEMPERATURES = [1.0, 1e-3, 1e-30, 1e-38, 3e-39, 1e-39, 1e-44, 1.4e-45, 1e-46]


def _spread_rows(vocab=64):
    """Distinct logits in [-4, 4); row 0 has its max at index 37, row 1 at the last index."""
    g = torch.Generator().manual_seed(7)
    real = torch.rand(2, vocab, generator=g) * 8 - 4
    real[0, 37] = 5.0
    real[1, -1] = 5.0
    return real


def _reference_probs(real, temperature, top_k, top_p):
    """softmax((z - max) / T) in float32 after top-k / top-p, independently of the library."""
    z = real.float()
    logits = (z - z.amax(dim=1, keepdim=True)) / torch.tensor(temperature, dtype=torch.float32)
    logits = torch.nan_to_num(logits, nan=0.0)  # 0 / 0 when T rounds to 0: the max itself
    if top_k:
        kth = logits.topk(top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=1)
    if top_p < 1.0:
        ordered, order = probs.sort(dim=1, descending=True, stable=True)
        drop = ordered.cumsum(dim=1) - ordered >= top_p
        drop[:, 0] = False
        probs = probs.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), 0.0)
    return probs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["T", "T-top-k5-top-p"])
@pytest.mark.parametrize("temperature", TEMPERATURES, ids=str)
def test_tiny_temperatures(backend, mode, temperature):
    """Every temperature gives a token of nonzero probability; below ~1e-30 (and whenever
    1 / T overflows) that is the argmax."""
    top_k, top_p = MODES[mode]
    real = _spread_rows()
    params = sk.SteeringParams(alpha=0.0, temperature=temperature, top_k=top_k, top_p=top_p, sensitive_top_k=0)
    tokens = _step(backend, real, params, generator=3)
    probs = _reference_probs(real, temperature, top_k, top_p)
    assert bool((probs.gather(1, tokens[:, None]) > 0).all()), (tokens, temperature)
    if temperature <= 1e-30:
        assert tokens.tolist() == [37, real.shape[1] - 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1e-39, 1.4e-45])
def test_overflowing_inverse_temperature_is_greedy(backend, temperature):
    """1 / T overflows float32: the step is greedy, ties included (lowest index), whatever
    the seed; the same as temperature 0."""
    real = _spread_rows()
    real[0, 40] = real[0, 37]  # a tie for the max in row 0
    params = sk.SteeringParams(alpha=0.0, temperature=temperature, top_k=5, top_p=0.9)
    assert decodes_greedily(params)
    greedy = _step(backend, real, params.replace(temperature=0.0, top_k=0, top_p=1.0))
    assert greedy.tolist() == [37, real.shape[1] - 1]
    for seed in (0, 1, 2):
        assert torch.equal(_step(backend, real, params, generator=seed), greedy), seed


def test_decodes_greedily_threshold():
    """Greedy exactly where float32's 1 / T is inf: T below 2**-128 (about 2.94e-39)."""
    assert not decodes_greedily(sk.SteeringParams(temperature=1e-38))
    assert not decodes_greedily(sk.SteeringParams(temperature=3e-39))
    assert decodes_greedily(sk.SteeringParams(temperature=2.9e-39))
    assert decodes_greedily(sk.SteeringParams(temperature=1e-46))
    assert decodes_greedily(sk.SteeringParams())


@requires_triton
@pytest.mark.parametrize("mode", list(MODES))
def test_triton_rescales_block_partials_to_the_row_max(monkeypatch, mode):
    """Huge logits in different vocabulary blocks of 16 tokens: each block shifts by its own
    max, and the merge must rescale them to the row's max (the max is in a later block, and
    in a refusal token for row 1)."""
    from safecode_kernels.ops import step_triton

    monkeypatch.setattr(step_triton, "_FORCE_BLOCK", 16)
    top_k, top_p = MODES[mode]
    real = torch.zeros(2, 64)
    real[0, 3], real[0, 40] = 3.0e38, 3.2e38
    real[1, 3], real[1, 62] = 3.0e38, 3.2e38  # token 62 is a refusal token
    for sensitive_top_k in (0, 20):
        params = sk.SteeringParams(
            alpha=0.0, temperature=0.5, top_k=top_k, top_p=top_p, sensitive_top_k=sensitive_top_k
        )
        for seed in (0, 1):
            got = _step("triton", real, params, refusal=[62], generator=seed).tolist()
            assert got == [40, 62], (sensitive_top_k, seed)
