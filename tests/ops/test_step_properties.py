"""Property-based tests of the step op: random shapes, values (±inf, NaN, huge and tiny
magnitudes) and parameters thrown at the ``cpu`` backend, which must either match the
``torch`` reference (same greedy tokens, same modulated logits and refusal mass, sampled
tokens inside the allowed set) or raise the same documented error with the same message.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import safecode_kernels as sk  # noqa: E402
from safecode_kernels.ops.dispatch import backend_status  # noqa: E402
from safecode_kernels.ops.step_inputs import StepError  # noqa: E402

pytestmark = pytest.mark.skipif(backend_status()["cpu"] is not None, reason="cpu backend unavailable")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INF = math.inf
SPECIAL = [
    -INF,
    INF,
    math.nan,
    3.0e38,
    -3.0e38,
    3.39e38,
    1e38,
    -1e38,
    1e-38,
    -1e-38,
    1e-45,
    0.0,
    -0.0,
    65504.0,
    7e4,
    1e30,
    -1e30,
]
BETAS = [0.0, 0.1, 0.4, 0.45, 0.5, 0.9, 1.0, 0.05, 0.2]

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def logits_rows(draw, batch: int, vocab: int):
    """[batch, vocab] fp32 values: a scaled normal-ish base with a few special values injected."""
    scale = draw(st.sampled_from([1.0, 1.0, 1.0, 10.0, 1e-38, 1e-30, 1e30, 1e37]))
    base = draw(st.lists(st.floats(-30.0, 30.0, width=32), min_size=batch * vocab, max_size=batch * vocab))
    x = np.asarray(base, dtype=np.float64).reshape(batch, vocab) * scale
    with np.errstate(over="ignore"):
        x = x.astype(np.float32)
    injections = draw(
        st.lists(
            st.tuples(st.integers(0, batch - 1), st.integers(0, vocab - 1), st.sampled_from(SPECIAL)),
            max_size=draw(st.sampled_from([0, 0, 2, 6])),
        )
    )
    for row, col, value in injections:
        x[row, col] = value
    if draw(st.booleans()) and draw(st.booleans()):  # sometimes a whole row banned
        x[draw(st.integers(0, batch - 1))] = -INF
    return torch.from_numpy(x)


@st.composite
def step_cases(draw):
    batch = draw(st.integers(1, 4))
    vocab = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from(DTYPES))
    real = draw(logits_rows(batch, vocab))
    if draw(st.booleans()):  # a correlated noised branch, like a real model's
        noised = (real * draw(st.sampled_from([0.5, 1.0, 0.0]))) + draw(logits_rows(batch, vocab)) * 0.5
    else:
        noised = draw(logits_rows(batch, vocab))
    with np.errstate(over="ignore"):
        real, noised = real.to(dtype), noised.to(dtype)  # may overflow fp16 to inf: both must raise
    verdict = torch.tensor(
        draw(st.lists(st.sampled_from([1, -1, 0]), min_size=batch, max_size=batch)), dtype=torch.int8
    )
    refusal = torch.tensor(sorted(draw(st.sets(st.integers(0, vocab - 1), max_size=vocab))), dtype=torch.int64)
    if draw(st.booleans()):
        mask = torch.zeros(vocab, dtype=torch.bool)
        mask[refusal] = True
        refusal = mask
    alpha = draw(st.sampled_from([0.0, 0.3, 1.0]) | st.floats(0.0, 3.0))
    params = sk.SteeringParams(
        alpha=alpha,
        alpha_safe=draw(st.none() | st.floats(0.0, 3.0)),
        real_weight=draw(st.sampled_from([1.0, 2.0]) | st.floats(0.01, 3.0)),
        plausibility=draw(st.sampled_from(BETAS)),
        sensitive_top_k=draw(st.integers(0, vocab + 3)),
        scope=draw(st.sampled_from(["sensitive", "all"])),
        boost=draw(st.sampled_from([1.0, 0.0, 1e30, -1e38, 3e38]) | st.floats(-5.0, 5.0)),
        suppress=draw(st.sampled_from([1.0, 0.0, INF, 1e38, -2.0]) | st.floats(0.0, 5.0)),
        temperature=draw(st.sampled_from([0.0, 0.0, 0.5, 1.0, 2.0])),
        top_k=draw(st.integers(0, vocab + 2)),
        top_p=draw(st.sampled_from([1.0, 0.9, 0.5, 0.01])),
    )
    seed = draw(st.integers(0, 2**40))
    return real, noised, verdict, refusal, params, seed


def _run(backend, real, noised, verdict, refusal, params, seed):
    try:
        return sk.safecode_step(
            real,
            noised,
            verdict,
            refusal,
            params,
            generator=seed,
            backend=backend,
            return_logits=True,
            return_stats=True,
        )
    except (StepError, ValueError, TypeError) as error:
        return error


def _allowed(logits: torch.Tensor, params: sk.SteeringParams) -> torch.Tensor:
    """Tokens sampling may return (a tie- and rounding-tolerant superset)."""
    x = logits.double() / params.temperature
    keep = torch.isfinite(x)
    if 0 < params.top_k < x.shape[1]:
        keep &= x >= x.topk(params.top_k, dim=1).values[:, -1:]
    if params.top_p < 1.0:
        x = x.masked_fill(~keep, -INF)
        probs = x.softmax(dim=1)
        for row in range(x.shape[0]):
            for v in range(x.shape[1]):
                if keep[row, v]:
                    above = probs[row][x[row] > x[row, v]].sum()
                    keep[row, v] = bool(above < params.top_p + 1e-5)
    return keep


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> bool:
    inf = torch.isinf(want) | torch.isnan(want)
    same_special = torch.equal(got[inf].isnan(), want[inf].isnan()) and torch.equal(
        got[inf].nan_to_num(0.0), want[inf].nan_to_num(0.0)
    )
    return same_special and bool(((got - want).abs() <= atol + rtol * want.abs())[~inf].all())


def check_matches_reference(real, noised, verdict, refusal, params, seed):
    want = _run("torch", real, noised, verdict, refusal, params, seed)
    got = _run("cpu", real, noised, verdict, refusal, params, seed)
    if isinstance(want, Exception) or isinstance(got, Exception):
        assert type(got) is type(want) and str(got) == str(want), f"torch: {want!r}\ncpu:   {got!r}"
        assert isinstance(want, ValueError)  # StepError is a ValueError
        return "error"
    assert torch.equal(torch.isneginf(got.logits), torch.isneginf(want.logits)), "banned tokens differ"
    assert _close(got.logits, want.logits, 1e-5, 1e-30), (got.logits, want.logits)
    for g, w in zip(got.refusal_mass, want.refusal_mass):
        assert _close(g, w, 1e-4, 1e-5), (g, w)
        assert bool(((g >= 0) & (g <= 1)).all())
    if params.is_greedy:
        assert torch.equal(got.tokens, want.tokens), (got.tokens, want.tokens)
    else:
        allowed = _allowed(want.logits, params)
        rows = torch.arange(real.shape[0])
        assert bool(allowed[rows, got.tokens].all()), "cpu sampled outside the allowed set"
        assert bool(allowed[rows, want.tokens].all()), "torch sampled outside the allowed set"
    return "ok"


@SETTINGS
@given(step_cases())
def test_cpu_matches_reference_or_both_raise(case):
    outcome = check_matches_reference(*case)
    hypothesis.event(outcome)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    vocab=st.integers(1, 30),
    values=st.lists(st.sampled_from([0.0, 1.0, -1.0, 2.0, -INF]), min_size=30, max_size=30),
    k=st.integers(0, 33),
    suppress=st.sampled_from([1.0, INF]),
    dtype=st.sampled_from(DTYPES),
)
def test_ties_match_reference(vocab, values, k, suppress, dtype):
    """Rows made of a few repeated values: ties everywhere, at the argmax and at the k-th."""
    row = torch.tensor(values[:vocab])
    if bool(torch.isneginf(row).all()):
        row[0] = 0.0
    real = torch.stack([row, row.flip(0), row.roll(1)]).to(dtype)
    noised = torch.zeros_like(real)
    refusal = torch.arange(0, vocab, 2)
    params = sk.SteeringParams(alpha=0.0, sensitive_top_k=k, suppress=suppress, boost=1.0)
    check_matches_reference(real, noised, torch.tensor([1, -1, 0], dtype=torch.int8), refusal, params, 0)
