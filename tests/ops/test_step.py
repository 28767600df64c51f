"""The step op (docs/design.md §2): every backend against the ``torch`` reference, the sampled
distribution, seeds, strided inputs, and every documented error.

The Triton backend has its own test file; this one covers ``cpu`` (and ``torch`` itself
where the property is the reference's own: sampling distribution, seeds, errors).

The backend-vs-reference grid is not a full cartesian product (the reference costs ~0.3 s
per call at B = 17, V = 152064 on a 2-core machine). It is
- the full product dtype x scope x sensitive_top_k x plausibility x bias on small
  vocabularies (V = 7 with B = 17, V = 1000 with B = 3), greedy; and
- a pairwise covering array over B x V x dtype x scope x k x plausibility x decoding mode x
  bias (every pair of values of any two dimensions appears in some case; the greedy
  construction below prefers cheap cases), plus a few extra large greedy cases.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import torch

import safecode_kernels as sk
from safecode_kernels.ops.dispatch import backend_status
from safecode_kernels.ops.step_inputs import StepError

CPU_REASON = backend_status()["cpu"]
requires_cpu = pytest.mark.skipif(CPU_REASON is not None, reason=f"cpu backend unavailable: {CPU_REASON}")
# Backends compared with the reference here (Triton has tests/ops/test_step_triton*.py).
BACKENDS = [pytest.param("cpu", marks=requires_cpu)]
# Backends whose own behaviour (errors, seeds, distribution) is checked, the reference included.
ALL_BACKENDS = ["torch", pytest.param("cpu", marks=requires_cpu)]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BIASES = {"1/1": (1.0, 1.0), "2.5/inf": (2.5, math.inf)}
MODES = {  # temperature, top_k, top_p
    "greedy": (0.0, 0, 1.0),
    "T": (0.8, 0, 1.0),
    "Tk": (1.2, 40, 1.0),
    "Tp": (0.7, 0, 0.9),
    "Tkp": (1.0, 50, 0.8),
}
NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------
# Inputs


@functools.lru_cache(maxsize=8)
def _base_inputs(batch: int, vocab: int, dtype_name: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(batch, vocab, generator=g) * 2.0
    noised = 0.7 * real + 0.7 * torch.randn(batch, vocab, generator=g)
    # Mixed verdicts in every batch of more than one row.
    verdict = torch.tensor([(1, -1, 0)[(row + seed) % 3] for row in range(batch)], dtype=torch.int8)
    dtype = DTYPES[dtype_name]
    return real.to(dtype), noised.to(dtype), verdict


def contrast(real, noised, verdict, params: sk.SteeringParams) -> torch.Tensor:
    """``z`` of docs/design.md §2.2 step 1, written independently of the library (fp32)."""
    zr, zn = real.float(), noised.float()
    alpha = torch.where(verdict.unsqueeze(1) == -1, params.alpha_safe, params.alpha).float()
    z = params.real_weight * zr - alpha * zn
    banned = (zr == NEG_INF) | (zn == NEG_INF)
    if params.plausibility > 0:
        banned |= zr < math.log(params.plausibility) + zr.amax(dim=1, keepdim=True)
    return z.masked_fill(banned, NEG_INF)


def refusal_ids_for(real, noised, verdict, params, seed: int) -> torch.Tensor:
    """Refusal ids that intersect the sensitive sets: the argmax of z in rows 0, 3, 6, ...,
    the runner-up in rows 1, 4, 7, ..., plus a few random ids; at most half the vocabulary,
    and never every finite token of a row."""
    z = contrast(real, noised, verdict, params)
    batch, vocab = z.shape
    order = torch.topk(z, min(2, vocab), dim=1).indices
    picks: list[int] = []
    for row in range(batch):
        if row % 3 == 0:
            picks.append(int(order[row, 0]))
        elif row % 3 == 1 and vocab > 1:
            picks.append(int(order[row, 1]))
    g = torch.Generator().manual_seed(seed + 1)
    picks += torch.randperm(vocab, generator=g)[: min(40, max(1, vocab // 200))].tolist()
    # Every row keeps a finite token outside R, so that suppress = inf never bans a whole row.
    finite = torch.isfinite(z)
    in_r = torch.zeros(vocab, dtype=torch.bool)
    for i in picks:
        if in_r[i] or int(in_r.sum()) >= max(1, vocab // 2):
            continue
        in_r[i] = True
        if not bool((finite & ~in_r).any(dim=1).all()):
            in_r[i] = False
    return in_r.nonzero().flatten()


def make_params(scope="sensitive", k="20", plausibility=0.0, mode="greedy", bias="1/1", vocab=1000, **kw):
    k_value = {"1": 1, "20": 20, "V": vocab, "V+5": vocab + 5}[k] if isinstance(k, str) else k
    temperature, top_k, top_p = MODES[mode]
    boost, suppress = BIASES[bias]
    return sk.SteeringParams(
        sensitive_top_k=k_value,
        scope=scope,
        plausibility=plausibility,
        boost=boost,
        suppress=suppress,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        **kw,
    )


def step(backend, real, noised, verdict, refusal, params, generator=0, **kw):
    kw.setdefault("return_logits", True)
    kw.setdefault("return_stats", True)
    return sk.safecode_step(real, noised, verdict, refusal, params, generator=generator, backend=backend, **kw)


# ------------------------------------------------------------------------------------------
# Comparisons


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float, what: str = "values") -> None:
    """Finite entries within ``atol + rtol * |want|``; infinities equal. (Cheaper than
    torch.testing.assert_close, which matters at 17 x 152064.)"""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    inf = torch.isinf(want)
    assert torch.equal(got[inf], want[inf]), f"{what}: infinities differ"
    bad = ~((got - want).abs() <= atol + rtol * want.abs()) & ~inf
    if bool(bad.any()):
        where = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what} differ at {where}: got {got[where].item()!r}, want {want[where].item()!r} "
            f"({int(bad.sum())} of {bad.numel()} entries)"
        )


def assert_logits_match(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "banned (-inf) tokens differ"
    assert not bool(torch.isnan(got).any() | torch.isposinf(got).any())
    assert_close(got, want, rtol=1e-5, atol=1e-6, what="modulated logits")


def first_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy choice with ties to the lowest index, independent of torch.argmax's policy."""
    top = logits.amax(dim=1, keepdim=True)
    index = torch.arange(logits.shape[1]).expand_as(logits)
    return torch.where(logits == top, index, logits.shape[1]).amin(dim=1)


def allowed_mask(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, slack: float = 1e-4):
    """Tokens that sampling may return, as a tie- and rounding-tolerant superset: finite,
    within the top-k values (ties at the k-th value included), and with less than
    ``top_p + slack`` probability mass on strictly more likely tokens."""
    x = logits.double() / temperature
    keep = torch.isfinite(x)
    vocab = x.shape[1]
    if 0 < top_k < vocab:
        keep &= x >= x.topk(top_k, dim=1).values[:, -1:]
    if top_p < 1.0:
        x = x.masked_fill(~keep, NEG_INF)
        for row in range(x.shape[0]):
            values, order = torch.sort(x[row], descending=True)
            probs = values.softmax(dim=0)
            before = probs.cumsum(dim=0) - probs
            _, group = torch.unique_consecutive(values, return_inverse=True)
            first_before = torch.full((int(group.max()) + 1,), math.inf, dtype=torch.float64)
            first_before = first_before.scatter_reduce(0, group, before, reduce="amin")
            keep_sorted = first_before[group] < top_p + slack
            keep[row] &= torch.zeros_like(keep_sorted).scatter(0, order, keep_sorted)
    return keep


def exact_probabilities(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The sampling distribution of design §2.2 step 4 in float64 (ties: lower index first)."""
    x = logits.double() / temperature
    vocab = x.shape[-1]
    values, order = torch.sort(x, dim=-1, descending=True, stable=True)
    keep = torch.isfinite(values)
    if 0 < top_k < vocab:
        keep[..., top_k:] = False
    probs = values.masked_fill(~keep, NEG_INF).softmax(dim=-1)
    if top_p < 1.0:
        before = probs.cumsum(dim=-1) - probs
        keep &= before < top_p
        keep[..., 0] = True
        probs = values.masked_fill(~keep, NEG_INF).softmax(dim=-1)
    return torch.zeros_like(probs).scatter(-1, order, probs)


def check_against_reference(backend, real, noised, verdict, refusal, params, seed=0):
    got = step(backend, real, noised, verdict, refusal, params, generator=seed)
    want = step("torch", real, noised, verdict, refusal, params, generator=seed)
    assert_logits_match(got.logits, want.logits)
    assert_close(got.refusal_mass[0], want.refusal_mass[0], rtol=1e-4, atol=1e-5, what="refusal mass before")
    assert_close(got.refusal_mass[1], want.refusal_mass[1], rtol=1e-4, atol=1e-5, what="refusal mass after")
    assert got.tokens.dtype == torch.int64 and got.tokens.shape == (real.shape[0],)
    if params.is_greedy:
        assert torch.equal(want.tokens, first_argmax(want.logits))
        assert torch.equal(got.tokens, want.tokens)
    else:
        allowed = allowed_mask(want.logits, params.temperature, params.top_k, params.top_p)
        rows = torch.arange(real.shape[0])
        assert bool(allowed[rows, want.tokens].all()), "the reference sampled outside the allowed set"
        assert bool(allowed[rows, got.tokens].all()), f"{backend} sampled outside the allowed set"
    # The modulated logits are the contrast plus the bias on (refusal ∩ sensitive) tokens.
    z = contrast(real, noised, verdict, params)
    moved = (want.logits != z) & torch.isfinite(z)
    assert not bool(moved[:, ~torch.isin(torch.arange(z.shape[1]), refusal)].any())
    return got, want


# ------------------------------------------------------------------------------------------
# The grid


def pairwise_cases(dims: dict, cost) -> list[dict]:
    """A covering array of strength 2: every pair of values of two dimensions occurs in some
    case. Greedy (AETG-style): each new case covers the most uncovered pairs, the cheapest
    such case first. Deterministic."""
    names = list(dims)
    values = [dims[n] for n in names]
    pairs = list(itertools.combinations(range(len(names)), 2))
    uncovered = {(i, a, j, b) for i, j in pairs for a in range(len(values[i])) for b in range(len(values[j]))}
    candidates = list(itertools.product(*(range(len(v)) for v in values)))
    cases = []
    while uncovered:

        def score(c, uncovered=uncovered):
            case = {n: values[d][c[d]] for d, n in enumerate(names)}
            return sum((i, c[i], j, c[j]) in uncovered for i, j in pairs), -cost(case)

        best = max(candidates, key=score)
        cases.append({n: values[d][best[d]] for d, n in enumerate(names)})
        uncovered -= {(i, best[i], j, best[j]) for i, j in pairs}
    return cases


GRID_DIMS = {
    "B": [1, 3, 17],
    "V": [7, 1000, 32000, 152064],
    "dtype": list(DTYPES),
    "scope": ["sensitive", "all"],
    "k": ["1", "20", "V", "V+5"],
    "plausibility": [0.0, 0.1],
    "mode": list(MODES),
    "bias": list(BIASES),
}
PAIRWISE = pairwise_cases(GRID_DIMS, lambda c: c["B"] * c["V"] * (1 if c["mode"] == "greedy" else 4))
EXTRA = [  # greedy at the largest sizes, which the cheapest-first covering array leaves out
    dict(B=17, V=152064, dtype="bf16", scope="sensitive", k="20", plausibility=0.0, mode="greedy", bias="1/1"),
    dict(B=3, V=152064, dtype="fp32", scope="all", k="V", plausibility=0.1, mode="greedy", bias="2.5/inf"),
    dict(B=17, V=32000, dtype="fp16", scope="sensitive", k="V+5", plausibility=0.1, mode="greedy", bias="2.5/inf"),
]
GRID = PAIRWISE + EXTRA


def _case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


def test_grid_covers_every_pair_of_values():
    for (n1, v1s), (n2, v2s) in itertools.combinations(GRID_DIMS.items(), 2):
        for v1, v2 in itertools.product(v1s, v2s):
            assert any(c[n1] == v1 and c[n2] == v2 for c in GRID), (n1, v1, n2, v2)


def _run_case(backend, B, V, dtype, scope, k, plausibility, mode, bias, seed):
    real, noised, verdict = _base_inputs(B, V, dtype, seed)
    params = make_params(scope, k, plausibility, mode, bias, vocab=V)
    refusal = refusal_ids_for(real, noised, verdict, params, seed)
    # The refusal set meets the sensitive set of at least one row.
    z = contrast(real, noised, verdict, params)
    assert bool(torch.isin(z.argmax(dim=1), refusal).any())
    check_against_reference(backend, real, noised, verdict, refusal, params, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", GRID, ids=_case_id)
def test_backend_matches_reference_grid(backend, case):
    _run_case(backend, seed=11, **case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", list(BIASES))
@pytest.mark.parametrize("plausibility", [0.0, 0.1])
@pytest.mark.parametrize("k", ["1", "20", "V", "V+5"])
@pytest.mark.parametrize("scope", ["sensitive", "all"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("B,V", [(17, 7), (3, 1000)])
def test_backend_matches_reference_small(backend, B, V, dtype, scope, k, plausibility, bias):
    _run_case(backend, B, V, dtype, scope, k, plausibility, "greedy", bias, seed=B + V)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("k", [1, 3, 4, 10])
def test_ties_break_toward_lower_index(backend, dtype, k):
    """Integer-valued logits: many exact ties at the argmax and at the k-th sensitive value.
    Every backend must pick the lowest index in both places, so results are identical."""
    g = torch.Generator().manual_seed(k)
    real = torch.randint(-3, 4, (9, 64), generator=g).float().to(DTYPES[dtype])
    noised = torch.zeros_like(real)
    verdict = torch.tensor([1, -1, 0] * 3, dtype=torch.int8)
    refusal = torch.arange(0, 64, 3)
    for boost, suppress in ((1.0, 1.0), (0.5, 7.0), (3.0, math.inf)):
        params = sk.SteeringParams(alpha=0.0, sensitive_top_k=k, boost=boost, suppress=suppress)
        got, want = check_against_reference(backend, real, noised, verdict, refusal, params)
        assert torch.equal(got.tokens, first_argmax(got.logits))
    # Ties are really there: the top value repeats in every row, and the k-th and (k+1)-th
    # values are equal in some row, so which tokens are "sensitive" depends on the tie rule.
    z = real.float()
    assert bool(((z == z.amax(dim=1, keepdim=True)).sum(dim=1) > 1).all())
    ordered = z.sort(dim=1, descending=True).values
    assert bool((ordered[:, k - 1] == ordered[:, k]).any())


def _beta(value):
    return pytest.param(value, id=f"beta={value}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "beta", [_beta(0.1), _beta(0.4), _beta(0.45), _beta(0.6), _beta(0.9), _beta(0.004996399639963996)]
)
def test_plausibility_cutoff_boundary(backend, beta):
    """Real logits exactly at, and one float either side of, max + log(beta): every backend
    must ban the same tokens as the reference."""
    cut = torch.tensor(math.log(beta), dtype=torch.float32)
    near = [
        cut,
        torch.nextafter(cut, torch.tensor(0.0)),
        torch.nextafter(cut, torch.tensor(-1.0)),
        torch.tensor(float(np.log(np.float32(beta)))),
    ]
    real = torch.stack([torch.tensor(0.0)] + near + [torch.tensor(-5.0)]).reshape(1, -1)
    noised = torch.zeros_like(real)
    params = sk.SteeringParams(plausibility=beta)
    check_against_reference(backend, real, noised, torch.zeros(1, dtype=torch.int8), torch.tensor([1]), params)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_bias_changes_the_token(backend):
    """The refusal bias acts: suppressing a safe row's argmax (a refusal token) or boosting an
    unsafe row's runner-up (a refusal token) changes the greedy token; a 'none' row never moves."""
    real, noised, _ = _base_inputs(6, 1000, "fp32", 3)
    verdict = torch.tensor([-1, 1, 0, -1, 1, 0], dtype=torch.int8)
    params = sk.SteeringParams(boost=50.0, suppress=50.0)
    z = contrast(real, noised, verdict, params)
    order = z.argsort(dim=1, descending=True)
    refusal = torch.tensor(
        sorted(
            {int(order[0, 0]), int(order[3, 0]), int(order[1, 1]), int(order[4, 1]), int(order[2, 0]), int(order[5, 1])}
        )
    )
    biased = step(backend, real, noised, verdict, refusal, params)
    plain = step(backend, real, noised, verdict, refusal, params.replace(boost=0.0, suppress=0.0))
    assert torch.equal(plain.tokens, order[:, 0])
    assert int(biased.tokens[0]) != int(order[0, 0]) and int(biased.tokens[3]) != int(order[3, 0])
    assert int(biased.tokens[1]) == int(order[1, 1]) and int(biased.tokens[4]) == int(order[4, 1])
    assert torch.equal(biased.tokens[[2, 5]], plain.tokens[[2, 5]])
    before, after = biased.refusal_mass
    assert bool((after[[1, 4]] > before[[1, 4]]).all()) and bool((after[[0, 3]] < before[[0, 3]]).all())
    assert_close(after[[2, 5]], before[[2, 5]], rtol=1e-6, atol=0.0)
    # Scope "sensitive" with k = 1: the runner-up is not in S, so the boost does nothing.
    narrow = step(backend, real, noised, verdict, refusal, params.replace(sensitive_top_k=1))
    assert int(narrow.tokens[1]) == int(order[1, 0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_refusal_forms_agree(backend):
    real, noised, verdict = _base_inputs(3, 1000, "fp32", 5)
    params = sk.SteeringParams(suppress=5.0, boost=5.0)
    ids = refusal_ids_for(real, noised, verdict, params, 5)
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[ids] = True
    outs = [
        step(backend, real, noised, verdict, r, params)
        for r in (ids, mask, sk.RefusalVocabulary.from_ids(ids), ids.tolist(), ids.to(torch.int32))
    ]
    for out in outs[1:]:
        assert torch.equal(out.tokens, outs[0].tokens) and torch.equal(out.logits, outs[0].logits)
    words = [("none", "unsafe", "safe")[int(v)] for v in verdict]
    out = step(backend, real, noised, words, ids, params)
    assert torch.equal(out.tokens, outs[0].tokens)


@pytest.mark.parametrize("backend", BACKENDS)
def test_presets_match_reference(backend):
    real, noised, verdict = _base_inputs(3, 1000, "bf16", 8)
    refusal = refusal_ids_for(real, noised, verdict, sk.SteeringParams(), 8)
    for params in (
        sk.SteeringParams.vcd(),
        sk.SteeringParams.cfg(2.0),
        sk.SteeringParams.with_probability_weights(1.0, 1.0, scope="all"),
    ):
        check_against_reference(backend, real, noised, verdict, refusal, params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_inputs_and_empty_refusal(backend):
    real, noised, verdict = _base_inputs(3, 1000, "fp32", 9)
    real, noised = real.clone(), noised.clone()
    real[0, :500] = NEG_INF
    noised[1, 1::2] = NEG_INF
    params = sk.SteeringParams(sensitive_top_k=700, boost=3.0, suppress=math.inf)
    refusal = refusal_ids_for(real, noised, verdict, params, 9)
    got, want = check_against_reference(backend, real, noised, verdict, refusal, params)
    assert bool(torch.isneginf(got.logits[0, :500]).all()) and bool(torch.isneginf(got.logits[1, 1::2]).all())
    empty = torch.zeros(0, dtype=torch.int64)
    got, want = check_against_reference(backend, real, noised, verdict, empty, params)
    assert bool((got.refusal_mass[0] == 0).all()) and bool((got.refusal_mass[1] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_optional_outputs(backend):
    real, noised, verdict = _base_inputs(3, 1000, "fp16", 4)
    refusal = refusal_ids_for(real, noised, verdict, sk.SteeringParams(), 4)
    full = step(backend, real, noised, verdict, refusal, sk.SteeringParams())
    bare = step(backend, real, noised, verdict, refusal, sk.SteeringParams(), return_logits=False, return_stats=False)
    assert bare.logits is None and bare.refusal_mass is None
    assert torch.equal(bare.tokens, full.tokens)
    for params in (sk.SteeringParams(), sk.SteeringParams(temperature=1.0, top_p=0.9)):
        only_stats = step(backend, real, noised, verdict, refusal, params, return_logits=False, generator=3)
        only_logits = step(backend, real, noised, verdict, refusal, params, return_stats=False, generator=3)
        assert only_stats.logits is None and only_logits.refusal_mass is None
        assert torch.equal(only_stats.tokens, only_logits.tokens)


# ------------------------------------------------------------------------------------------
# Sampling: the distribution

# (temperature, top_k, top_p) on V = 50: plain, temperature + top-k, temperature + top-p, all three.
SAMPLING_COMBOS = [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.3, 0, 0.8), (0.9, 20, 0.7), (2.0, 5, 0.95)]
# False alarm probability per test (two checks, half each): 2e-8, so that all ~20 sampling
# tests together fail by chance with probability < 1e-6 (the seeds are fixed, so a given
# version of the code passes or fails deterministically; the bound guards future changes).
FALSE_ALARM = 2e-8


def assert_drawn_from(tokens: torch.Tensor, probs: torch.Tensor) -> None:
    """``tokens`` are iid draws from ``probs``; fails with probability < FALSE_ALARM if so.

    1. Never a token of probability 0.
    2. Every token's count within a Bernstein bound, union-bounded over the support.
    3. A chi-square test over bins of expected count >= 50 (when scipy is installed).
    """
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    assert counts.numel() == probs.numel()
    outside = (counts > 0) & (probs == 0)
    assert not bool(outside.any()), f"sampled tokens outside the allowed set: {outside.nonzero().flatten().tolist()}"
    support = probs > 0
    level = math.log(2 * int(support.sum()) / (FALSE_ALARM / 2))
    var = n * probs * (1 - probs)
    bound = level / 3 + torch.sqrt(level**2 / 9 + 2 * level * var)
    deviation = (counts - n * probs).abs()
    worst = int(torch.argmax(deviation - bound))
    assert bool((deviation <= bound).all()), (
        f"token {worst}: {int(counts[worst])} draws of {n}, "
        f"expected {n * float(probs[worst]):.1f} ± {float(bound[worst]):.1f}"
    )
    try:
        from scipy.stats import chi2
    except ImportError:  # pragma: no cover - scipy is optional
        return
    expected = (n * probs[support]).numpy()
    observed = counts[support].numpy()
    order = np.argsort(expected)
    bins_e, bins_o, acc_e, acc_o = [], [], 0.0, 0.0
    for i in order:  # merge the rarest tokens until each bin expects >= 50 draws
        acc_e += expected[i]
        acc_o += observed[i]
        if acc_e >= 50:
            bins_e.append(acc_e)
            bins_o.append(acc_o)
            acc_e = acc_o = 0.0
    if acc_e and bins_e:
        bins_e[-1] += acc_e
        bins_o[-1] += acc_o
    if len(bins_e) > 1:
        stat = sum((o - e) ** 2 / e for o, e in zip(bins_o, bins_e))
        p_value = chi2.sf(stat, len(bins_e) - 1)
        assert p_value > FALSE_ALARM / 2, f"chi-square {stat:.1f} on {len(bins_e) - 1} dof, p = {p_value:.2e}"


def _sampling_row(vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    real = torch.randn(1, vocab, generator=g) * 1.5
    noised = 0.5 * real + torch.randn(1, vocab, generator=g) * 0.5
    return real, noised


def _sampling_cases():
    for i, combo in enumerate(SAMPLING_COMBOS):
        for verdict in (1, -1):
            name = "T={}-k={}-p={}-verdict={}".format(*combo, verdict)
            yield pytest.param("cpu", combo, verdict, id="cpu-" + name, marks=requires_cpu)
            if i % 2 == verdict % 2:  # the reference's own sampler: every combo once, less often
                yield pytest.param("torch", combo, verdict, id="torch-" + name)


@pytest.mark.parametrize("backend,combo,verdict", list(_sampling_cases()))
def test_sampling_distribution(backend, combo, verdict):
    """One row replicated over 40000 rows: the sampled frequencies match the reference's
    exact distribution (from its modulated logits), and no draw is outside top-k / top-p."""
    temperature, top_k, top_p = combo
    real, noised = _sampling_row(50, seed=int(temperature * 10) + top_k)
    params = sk.SteeringParams(
        temperature=temperature, top_k=top_k, top_p=top_p, boost=1.5, suppress=1.5, sensitive_top_k=10
    )
    z = contrast(real, noised, torch.tensor([verdict], dtype=torch.int8), params)
    refusal = torch.sort(z[0].argsort(descending=True)[[0, 3, 8, 30]]).values
    reference = step("torch", real, noised, torch.tensor([verdict], dtype=torch.int8), refusal, params)
    assert not torch.equal(reference.logits, z), "the bias must act in this test"
    probs = exact_probabilities(reference.logits[0], temperature, top_k, top_p)
    # No top-p boundary within rounding of the cut: the distribution is unambiguous.
    sorted_probs = exact_probabilities(reference.logits[0], temperature, top_k, 1.0).sort(descending=True).values
    assert bool(((sorted_probs.cumsum(0) - top_p).abs() > 1e-4).all()) or top_p == 1.0
    n = 40000
    out = step(
        backend,
        real.repeat(n, 1),
        noised.repeat(n, 1),
        torch.full((n,), verdict, dtype=torch.int8),
        refusal,
        params,
        generator=1234 + verdict,
        return_logits=False,
        return_stats=False,
    )
    assert_drawn_from(out.tokens, probs)


@pytest.fixture
def four_threads():
    """Four OpenMP threads, so that a single row is split into vocabulary chunks (and merged)."""
    old = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(old)


@requires_cpu
@pytest.mark.parametrize(
    "combo", [(1.0, 0, 1.0), (1.0, 6, 1.0), (0.8, 0, 0.6), (0.7, 20, 0.9)], ids=lambda c: "T={}-k={}-p={}".format(*c)
)
def test_sampling_distribution_large_vocab_many_seeds(combo, four_threads):
    """B = 1 over a 65536-token row (split into chunks): 3000 seeds (1500 with top-p), one
    draw each. The mass sits on 12 tokens spread over the row (both ends of every chunk) and
    a long tail."""
    temperature, top_k, top_p = combo
    vocab = 65536
    g = torch.Generator().manual_seed(77)
    real = -9.0 + 0.5 * torch.randn(1, vocab, generator=g)
    head = torch.tensor([0, 5, 16383, 16384, 20000, 32767, 32768, 40000, 49151, 49152, 60000, 65535])
    real[0, head] = torch.randn(len(head), generator=g)
    noised = 0.5 * real
    params = sk.SteeringParams(temperature=temperature, top_k=top_k, top_p=top_p, boost=1.0, suppress=1.0)
    verdict = torch.tensor([1], dtype=torch.int8)
    refusal = head[[1, 6, 9]]
    reference = step("torch", real, noised, verdict, refusal, params)
    probs = exact_probabilities(reference.logits[0], temperature, top_k, top_p)
    draws = torch.tensor(
        [
            int(
                step(
                    "cpu",
                    real,
                    noised,
                    verdict,
                    refusal,
                    params,
                    generator=seed,
                    return_logits=False,
                    return_stats=False,
                ).tokens[0]
            )
            for seed in range(1500 if top_p < 1.0 else 3000)  # top-p over a whole row costs ~1 ms
        ]
    )
    # Bins: the 12 head tokens and the tail as one token.
    tail = torch.ones(vocab, dtype=torch.bool)
    tail[head] = False
    binned_probs = torch.cat([probs[head], probs[tail].sum().reshape(1)])
    index_of = torch.full((vocab,), len(head), dtype=torch.int64)
    index_of[head] = torch.arange(len(head))
    assert not bool(((probs == 0) & torch.isin(torch.arange(vocab), draws)).any()), "a draw outside the allowed set"
    assert_drawn_from(index_of[draws], binned_probs)


@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param("cpu", marks=requires_cpu),
    ],
)
@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampling_huge_finite_logits(backend, top_p):
    """Finite logits near float32's limit with temperature < 1: valid input, a valid draw."""
    real = torch.zeros(1, 22)
    real[0, 0], real[0, 1] = 1.0e38, 0.9e38
    params = sk.SteeringParams(alpha=0.0, real_weight=2.0, temperature=0.5, top_p=top_p)
    out = sk.safecode_step(real, torch.zeros_like(real), [1], [], params, generator=0, backend=backend)
    assert int(out.tokens[0]) == 0  # exp(-2e37) for token 1: token 0 is certain


# ------------------------------------------------------------------------------------------
# Sampling: seeds


def _seed_inputs():
    # 32 x 256: small enough to stay below torch's intra-op parallel grain (cheap on a busy machine).
    real, noised, verdict = _base_inputs(32, 256, "fp32", 21)
    refusal = refusal_ids_for(real, noised, verdict, sk.SteeringParams(), 21)
    return real, noised, verdict, refusal


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("mode", ["T", "Tk", "Tp", "Tkp"])
def test_seed_determinism(backend, mode):
    real, noised, verdict, refusal = _seed_inputs()
    params = make_params(mode=mode, vocab=256)
    params = params.replace(temperature=2.0)  # a flat distribution: different seeds must differ
    run = functools.partial(
        step, backend, real, noised, verdict, refusal, params, return_logits=False, return_stats=False
    )
    a, b = run(generator=42).tokens, run(generator=42).tokens
    assert torch.equal(a, b), "same int seed, different tokens"
    assert not torch.equal(a, run(generator=43).tokens), "different seeds gave identical tokens in all 32 rows"
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    first = run(generator=g1).tokens
    assert torch.equal(first, run(generator=g2).tokens), "same generator state, different tokens"
    # The generator advances: the next step draws a different stream.
    assert not torch.equal(first, run(generator=g1).tokens)
    # None draws from torch's default generator, so torch.manual_seed reproduces it.
    torch.manual_seed(99)
    c = run(generator=None).tokens
    torch.manual_seed(99)
    assert torch.equal(c, run(generator=None).tokens)


@requires_cpu
@pytest.mark.parametrize("mode", ["greedy", "T", "Tk", "Tp"])
def test_cpu_result_independent_of_thread_count(mode):
    """Rows split into vocabulary chunks (small batch, many threads) give the same result."""
    real, noised, verdict = _base_inputs(1, 152064, "bf16", 31)
    refusal = refusal_ids_for(real, noised, verdict, sk.SteeringParams(), 31)
    params = make_params(mode=mode, vocab=152064, scope="sensitive", k="20", bias="2.5/inf")
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            outs.append(step("cpu", real, noised, verdict, refusal, params, generator=5))
    finally:
        torch.set_num_threads(old)
    for out in outs[1:]:
        assert torch.equal(out.tokens, outs[0].tokens)
        assert torch.equal(out.logits, outs[0].logits)
        for got, want in zip(out.refusal_mass, outs[0].refusal_mass):
            assert_close(got, want, rtol=1e-6, atol=1e-7, what="refusal mass")


# ------------------------------------------------------------------------------------------
# Non-contiguous inputs


def _views(real: torch.Tensor, noised: torch.Tensor):
    """(name, real view, noised view) with the same values as real[:3], noised[:3]."""
    batch, vocab = 3, real.shape[1]
    r, n = real[:batch], noised[:batch]
    wide_r = torch.full((2 * batch, vocab + 13), -7.0, dtype=real.dtype)
    wide_n = torch.full((2 * batch, vocab + 13), 5.0, dtype=real.dtype)
    wide_r[::2, 5 : 5 + vocab], wide_n[::2, 5 : 5 + vocab] = r, n
    big_r = torch.randn(batch + 4, vocab).to(real.dtype)
    big_n = torch.randn(batch + 4, vocab).to(real.dtype)
    big_r[2 : 2 + batch], big_n[2 : 2 + batch] = r, n
    return [
        ("every-other-row", wide_r[::2, 5 : 5 + vocab], wide_n[::2, 5 : 5 + vocab]),
        ("transposed-twice", r.t().contiguous().t(), n.t().contiguous().t()),
        ("slice-of-larger-batch", big_r[2 : 2 + batch], big_n[2 : 2 + batch]),
        ("vocab-stride-2", torch.stack([r, r], dim=2)[..., 0], torch.stack([n, n], dim=2)[..., 0]),
        ("mixed", r.t().contiguous().t(), big_n[2 : 2 + batch]),
    ]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mode", ["greedy", "Tkp"])
def test_non_contiguous_inputs(backend, dtype, mode):
    real, noised, verdict = _base_inputs(3, 1000, dtype, 13)
    params = make_params(mode=mode, vocab=1000)
    refusal = refusal_ids_for(real, noised, verdict, params, 13)
    want = step(backend, real.contiguous(), noised.contiguous(), verdict, refusal, params, generator=8)
    for name, r, n in _views(real, noised):
        assert torch.equal(r, real) and torch.equal(n, noised)
        if name != "slice-of-larger-batch":
            assert not (r.is_contiguous() and n.is_contiguous()), name
        got = step(backend, r, n, verdict, refusal, params, generator=8)
        assert torch.equal(got.tokens, want.tokens), name
        assert torch.equal(got.logits, want.logits), name
        assert torch.equal(got.refusal_mass[0], want.refusal_mass[0]), name
    # A strided refusal id tensor, a strided bool mask, a strided verdict of another int type.
    mask = torch.zeros(1000, 2, dtype=torch.bool)
    mask[refusal, 0] = True
    for ids, v in (
        (torch.stack([refusal, refusal], dim=1)[:, 0], verdict),
        (mask[:, 0], torch.stack([verdict, verdict], dim=1)[:, 0].to(torch.int32)),
    ):
        got = step(backend, real, noised, v, ids, params, generator=8)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.logits, want.logits)


@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param("cpu", marks=requires_cpu),
    ],
)
def test_strided_int8_verdict(backend):
    real, noised, verdict = _base_inputs(3, 1000, "fp32", 13)
    refusal = torch.tensor([2, 30, 500])
    want = step(backend, real, noised, verdict, refusal, sk.SteeringParams())
    strided = torch.stack([verdict, verdict], dim=1)[:, 0]
    assert strided.dtype == torch.int8 and not strided.is_contiguous()
    got = step(backend, real, noised, strided, refusal, sk.SteeringParams())
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.logits, want.logits)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_broadcast_rows(backend):
    """Expanded inputs (row stride 0): rows overlap, which is fine for read-only inputs."""
    real, noised, _ = _base_inputs(1, 1000, "fp32", 17)
    verdict = torch.tensor([1, -1, 0, 1], dtype=torch.int8)
    refusal = torch.tensor([3, 17, 400])
    params = sk.SteeringParams()
    want = step("torch", real.repeat(4, 1), noised.repeat(4, 1), verdict, refusal, params)
    got = step(backend, real.expand(4, -1), noised.expand(4, -1), verdict, refusal, params)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.logits, want.logits)


# ------------------------------------------------------------------------------------------
# Errors (docs/design.md §2.2: clear ValueError / TypeError, never a wrong answer or a crash)


def _valid(batch=3, vocab=10):
    real, noised, verdict = _base_inputs(batch, vocab, "fp32", 1)
    return dict(
        logits_real=real.clone(),
        logits_noised=noised.clone(),
        verdict=verdict,
        refusal=torch.tensor([1, 4]),
        params=sk.SteeringParams(),
    )


def _with(**changes):
    args = _valid()
    args.update(changes)
    return args


def _bad_row(which, row, value):
    args = _valid()
    args[which][row, 4] = value
    return args


def _banned(real_value=NEG_INF):
    args = _valid()
    args["logits_real"][1] = real_value
    return args


def _all_refusal_banned(scope):
    # V = 3, every token a refusal token, safe verdict, suppress = inf: nothing is left.
    return dict(
        logits_real=torch.randn(2, 3),
        logits_noised=torch.randn(2, 3),
        verdict=torch.tensor([1, -1], dtype=torch.int8),
        refusal=torch.tensor([0, 1, 2]),
        params=sk.SteeringParams(suppress=math.inf, scope=scope, sensitive_top_k=3),
    )


def _huge():
    args = _valid()
    args["logits_real"][2, 7] = 3e38
    args["params"] = sk.SteeringParams(real_weight=2.0)
    return args


def _huge_bias():
    args = _valid()
    args["logits_real"][0, 1] = 3.3e38  # a refusal token, the argmax; unsafe row 0 boosts it
    args["logits_noised"][0, 1] = 0.0
    args["verdict"] = torch.tensor([1, 0, 0], dtype=torch.int8)
    args["params"] = sk.SteeringParams(boost=1e38)
    return args


ERROR_CASES = {
    # name: (kwargs, exception type, message regex)
    "real-not-tensor": (_with(logits_real=[[1.0, 2.0]]), TypeError, "logits_real must be a torch.Tensor"),
    "int-dtype": (_with(logits_real=torch.ones(3, 10, dtype=torch.int32)), TypeError, "logits_real has dtype"),
    "float64": (_with(logits_noised=torch.ones(3, 10, dtype=torch.float64)), TypeError, "logits_noised has dtype"),
    "1-d": (_with(logits_real=torch.ones(10), logits_noised=torch.ones(10)), ValueError, r"shape \[batch, vocab\]"),
    "shape-mismatch": (_with(logits_noised=torch.ones(3, 11)), ValueError, "differ in shape"),
    "batch-mismatch": (_with(logits_noised=torch.ones(2, 10)), ValueError, "differ in shape"),
    "dtype-mismatch": (
        _with(logits_noised=torch.ones(3, 10, dtype=torch.float16)),
        TypeError,
        "logits_real is torch.float32 but logits_noised is torch.float16",
    ),
    "device-mismatch": (_with(logits_noised=torch.ones(3, 10, device="meta")), ValueError, "meta"),
    "V=0": (
        _with(logits_real=torch.ones(3, 0), logits_noised=torch.ones(3, 0), refusal=torch.zeros(0, dtype=torch.int64)),
        ValueError,
        r"vocabulary is empty \(V = 0\)",
    ),
    "B=0": (
        _with(logits_real=torch.ones(0, 10), logits_noised=torch.ones(0, 10), verdict=torch.zeros(0, dtype=torch.int8)),
        ValueError,
        "batch is empty",
    ),
    "refusal-id-too-large": (
        _with(refusal=torch.tensor([1, 10])),
        ValueError,
        r"refusal id 10 is outside the vocabulary \[0, 10\)",
    ),
    "refusal-id-negative": (_with(refusal=torch.tensor([-1, 3])), ValueError, r"refusal id -1 is outside"),
    "refusal-vocab-too-large": (_with(refusal=sk.RefusalVocabulary([2, 12])), ValueError, "refusal id 12 is outside"),
    "refusal-unsorted": (_with(refusal=torch.tensor([4, 1])), ValueError, "sorted and unique"),
    "refusal-duplicate": (_with(refusal=torch.tensor([1, 1, 4])), ValueError, "sorted and unique"),
    "refusal-float": (_with(refusal=torch.tensor([1.0, 4.0])), TypeError, "integer tensor"),
    "refusal-2d": (_with(refusal=torch.tensor([[1, 4]])), ValueError, "1-D"),
    "refusal-mask-length": (
        _with(refusal=torch.zeros(11, dtype=torch.bool)),
        ValueError,
        r"refusal mask must have shape \[10\]",
    ),
    "refusal-type": (_with(refusal="I'm sorry"), TypeError, "refusal must be"),
    "real-nan": (_bad_row("logits_real", 1, float("nan")), StepError, r"logits_real row 1 contains NaN or \+inf"),
    "real-inf": (_bad_row("logits_real", 2, float("inf")), StepError, r"logits_real row 2 contains NaN or \+inf"),
    "noised-nan": (_bad_row("logits_noised", 0, float("nan")), StepError, r"logits_noised row 0 contains NaN or \+inf"),
    "noised-inf": (_bad_row("logits_noised", 2, float("inf")), StepError, r"logits_noised row 2 contains NaN or \+inf"),
    "all-banned": (_banned(), StepError, "row 1: every token is banned after the contrast"),
    "all-banned-by-noised": (
        dict(_valid(), logits_noised=torch.full((3, 10), NEG_INF)),
        StepError,
        "row 0: every token is banned after the contrast",
    ),
    "all-refusal-suppressed-sensitive": (
        _all_refusal_banned("sensitive"),
        StepError,
        "row 1: every token is banned after the refusal bias",
    ),
    "all-refusal-suppressed-all": (
        _all_refusal_banned("all"),
        StepError,
        "row 1: every token is banned after the refusal bias",
    ),
    "contrast-overflow": (_huge(), StepError, "row 2: the contrast overflows float32"),
    "bias-overflow": (_huge_bias(), StepError, "row 0: the refusal bias overflows float32"),
    "verdict-value-tensor": (
        _with(verdict=torch.tensor([1, 2, 0], dtype=torch.int8)),
        ValueError,
        "unknown verdict value 2 in row 1",
    ),
    "verdict-value-uint8": (
        _with(verdict=torch.tensor([0, 0, 255], dtype=torch.uint8)),
        ValueError,
        "unknown verdict value 255 in row 2",
    ),
    "verdict-word": (_with(verdict=["unsafe", "maybe", "safe"]), ValueError, "unknown verdict 'maybe'"),
    "verdict-int": (_with(verdict=[1, 0, 5]), ValueError, "unknown verdict value 5"),
    "verdict-float": (_with(verdict=torch.zeros(3)), TypeError, "verdict must be an integer tensor"),
    "verdict-length-tensor": (
        _with(verdict=torch.zeros(2, dtype=torch.int8)),
        ValueError,
        r"verdict must have shape \[3\]",
    ),
    "verdict-length-list": (_with(verdict=["safe"] * 4), ValueError, "got 4 verdicts for a batch of 3 rows"),
    "verdict-str": (_with(verdict="safe"), TypeError, "verdict must be"),
    "verdict-device": (
        _with(verdict=torch.zeros(3, dtype=torch.int8, device="meta")),
        ValueError,
        "verdict is on meta",
    ),
    "params-type": (_with(params={"alpha": 0.3}), TypeError, "params must be a SteeringParams"),
}


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_bad_input_raises(backend, name):
    kwargs, error, message = ERROR_CASES[name]
    with pytest.raises(error, match=message):
        sk.safecode_step(**kwargs, backend=backend)


def test_step_error_is_a_value_error():
    assert issubclass(StepError, ValueError)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_first_bad_row_is_named(backend):
    """Several bad rows: the first problem in check order, in the lowest row having it."""
    args = _valid(batch=5)
    args["logits_real"][3, 2] = float("nan")
    args["logits_noised"][1, 2] = float("inf")
    args["logits_real"][0] = NEG_INF
    args["logits_real"][4, 0] = float("inf")
    with pytest.raises(StepError, match=r"logits_real row 3 contains"):
        sk.safecode_step(**args, backend=backend)
    args["logits_real"][3, 2] = 0.0
    args["logits_real"][4, 0] = 0.0
    with pytest.raises(StepError, match=r"logits_noised row 1 contains"):
        sk.safecode_step(**args, backend=backend)
    args["logits_noised"][1, 2] = 0.0
    with pytest.raises(StepError, match=r"row 0: every token is banned after the contrast"):
        sk.safecode_step(**args, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_neg_inf_is_allowed(backend):
    args = _valid()
    args["logits_real"][:, :9] = NEG_INF  # one token left per row
    out = sk.safecode_step(**args, backend=backend, return_logits=True)
    assert out.tokens.tolist() == [9, 9, 9]
    args["params"] = sk.SteeringParams(temperature=1.0, top_p=0.5)
    assert sk.safecode_step(**args, backend=backend, generator=1).tokens.tolist() == [9, 9, 9]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize(
    "generator,error,message",
    [
        ("seed", TypeError, "generator must be None, an int seed or a torch.Generator"),
        (1.5, TypeError, "generator must be"),
        (True, TypeError, "generator must be"),
        (-3, ValueError, "a seed must be >= 0"),
    ],
)
def test_bad_generator(backend, generator, error, message):
    args = _with(params=sk.SteeringParams(temperature=1.0))
    with pytest.raises(error, match=message):
        sk.safecode_step(**args, generator=generator, backend=backend)


@pytest.mark.parametrize(
    "backend,error,message",
    [
        ("cuda", ValueError, "unknown backend 'cuda'"),
        ("", ValueError, "unknown backend ''"),
        (3, TypeError, "backend must be a str"),
    ],
)
def test_bad_backend(backend, error, message):
    with pytest.raises(error, match=message):
        sk.safecode_step(**_valid(), backend=backend)


@pytest.mark.parametrize(
    "field,value,error,message",
    [
        ("alpha", -0.1, ValueError, "alpha must be >= 0"),
        ("alpha_safe", -1.0, ValueError, "alpha_safe must be >= 0"),
        ("alpha", math.nan, ValueError, "alpha must be finite"),
        ("sensitive_top_k", -1, ValueError, "sensitive_top_k must be >= 0"),
        ("sensitive_top_k", 2.5, TypeError, "sensitive_top_k must be an int"),
        ("top_k", -2, ValueError, "top_k must be >= 0"),
        ("top_p", 0.0, ValueError, "top_p must be > 0"),
        ("top_p", 1.5, ValueError, "top_p must be <= 1"),
        ("top_p", -0.5, ValueError, "top_p must be > 0"),
        ("temperature", -1.0, ValueError, "temperature must be >= 0"),
        ("temperature", math.inf, ValueError, "temperature must be finite"),
        ("real_weight", 0.0, ValueError, "real_weight must be > 0"),
        ("plausibility", 1.5, ValueError, "plausibility must be <= 1"),
        ("scope", "most", ValueError, "scope must be 'sensitive' or 'all'"),
        ("boost", math.inf, ValueError, "boost must be finite"),
        ("suppress", -math.inf, ValueError, "suppress must be a number or \\+inf"),
        ("suppress", math.nan, ValueError, "suppress must be a number or \\+inf"),
    ],
)
def test_bad_params(field, value, error, message):
    with pytest.raises(error, match=message):
        sk.SteeringParams(**{field: value})


# ------------------------------------------------------------------------------------------
# The C++ binding validates raw buffers itself: no call from Python may crash the process.


def _raw(batch=2, vocab=8, **changes):
    from safecode_kernels import _C

    rng = np.random.default_rng(0)
    args = dict(
        real=rng.standard_normal((batch, vocab)).astype(np.float32),
        noised=rng.standard_normal((batch, vocab)).astype(np.float32),
        dtype="float32",
        verdict=np.zeros(batch, np.int8),
        refusal_ids=np.array([1, 3], np.int64),
        tokens=np.zeros(batch, np.int64),
        status=np.zeros(batch, np.int32),
        params=_C.StepParams(),
    )
    args.update(changes)
    return args


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _kernel_params(**fields):
    from safecode_kernels import _C

    p = _C.StepParams()
    for k, v in fields.items():
        setattr(p, k, v)
    return p


def _raw_cases():
    f32 = np.float32
    base = _raw()
    return {
        "real-1d": dict(real=np.zeros(8, f32)),
        "real-3d": dict(real=np.zeros((2, 8, 1), f32)),
        "real-list": dict(real=[[0.0] * 8] * 2),
        "shape-mismatch": dict(noised=np.zeros((2, 9), f32)),
        "batch-mismatch": dict(noised=np.zeros((3, 8), f32)),
        "itemsize-float64": dict(real=np.zeros((2, 8), np.float64)),
        "itemsize-half-as-float": dict(real=np.zeros((2, 8), np.float16), noised=np.zeros((2, 8), np.float16)),
        "float-as-half": dict(dtype="float16"),
        "dtype-name": dict(dtype="float64"),
        "vocab-stride": dict(real=np.zeros((8, 2), f32).T),
        "negative-row-stride": dict(real=base["real"][::-1]),
        "overlapping-logits-output": dict(logits=np.lib.stride_tricks.as_strided(np.zeros(9, f32), (2, 8), (4, 4))),
        "batch-0": dict(
            real=np.zeros((0, 8), f32),
            noised=np.zeros((0, 8), f32),
            verdict=np.zeros(0, np.int8),
            tokens=np.zeros(0, np.int64),
            status=np.zeros(0, np.int32),
        ),
        "vocab-0": dict(real=np.zeros((2, 0), f32), noised=np.zeros((2, 0), f32), refusal_ids=np.zeros(0, np.int64)),
        "verdict-length": dict(verdict=np.zeros(3, np.int8)),
        "verdict-int64": dict(verdict=np.zeros(2, np.int64)),
        "verdict-value": dict(verdict=np.array([0, 7], np.int8)),
        "verdict-strided": dict(verdict=np.zeros(4, np.int8)[::2]),
        "refusal-int32": dict(refusal_ids=np.array([1, 3], np.int32)),
        "refusal-2d": dict(refusal_ids=np.array([[1, 3]], np.int64)),
        "refusal-out-of-range": dict(refusal_ids=np.array([1, 8], np.int64)),
        "refusal-negative": dict(refusal_ids=np.array([-5, 3], np.int64)),
        "refusal-unsorted": dict(refusal_ids=np.array([3, 1], np.int64)),
        "refusal-duplicate": dict(refusal_ids=np.array([3, 3], np.int64)),
        "tokens-readonly": dict(tokens=_readonly(np.zeros(2, np.int64))),
        "tokens-length": dict(tokens=np.zeros(1, np.int64)),
        "tokens-int32": dict(tokens=np.zeros(2, np.int32)),
        "status-readonly": dict(status=_readonly(np.zeros(2, np.int32))),
        "status-int64": dict(status=np.zeros(2, np.int64)),
        "logits-shape": dict(logits=np.zeros((2, 7), f32)),
        "logits-readonly": dict(logits=_readonly(np.zeros((2, 8), f32))),
        "logits-float64": dict(logits=np.zeros((2, 8), np.float64)),
        "logits-strided": dict(logits=np.zeros((2, 16), f32)[:, :8]),
        "mass-before-only": dict(mass_before=np.zeros(2, f32)),
        "mass-after-readonly": dict(mass_before=np.zeros(2, f32), mass_after=_readonly(np.zeros(2, f32))),
        "mass-length": dict(mass_before=np.zeros(3, f32), mass_after=np.zeros(3, f32)),
        "params-type": dict(params=None),
        "temperature-nan": dict(params=_kernel_params(temperature=math.nan)),
        "temperature-negative": dict(params=_kernel_params(temperature=-1.0)),
        "top-p-zero": dict(params=_kernel_params(top_p=0.0)),
        "top-p-large": dict(params=_kernel_params(top_p=1.5)),
        "top-k-negative": dict(params=_kernel_params(top_k=-1)),
        "sensitive-k-negative": dict(params=_kernel_params(sensitive_top_k=-3)),
        "alpha-negative": dict(params=_kernel_params(alpha_unsafe=-1.0)),
        "alpha-safe-nan": dict(params=_kernel_params(alpha_safe=math.nan)),
        "real-weight-zero": dict(params=_kernel_params(real_weight=0.0)),
        "bias-plus-inf": dict(params=_kernel_params(bias_unsafe=math.inf)),
        "bias-nan": dict(params=_kernel_params(bias_safe=math.nan)),
        "log-plausibility-positive": dict(params=_kernel_params(log_plausibility=0.7)),
        "log-plausibility-nan": dict(params=_kernel_params(log_plausibility=float("nan"))),
    }


@requires_cpu
@pytest.mark.parametrize("name", list(_raw_cases()))
def test_binding_rejects_bad_buffers(name):
    from safecode_kernels import _C

    with pytest.raises((ValueError, TypeError)):
        _C.step(**_raw(**_raw_cases()[name]))


@requires_cpu
def test_binding_valid_call_and_row_status():
    """After all the rejected calls the process is alive, and a valid call reports bad rows
    through ``status`` (never raising): NaN -> 1, +inf noised -> 2, all -inf -> 3."""
    from safecode_kernels import _C

    args = _raw(batch=4)
    args["real"][1, 2] = np.nan
    args["noised"][2, 5] = np.inf
    args["real"][3] = -np.inf
    logits, before, after = np.zeros((4, 8), np.float32), np.zeros(4, np.float32), np.zeros(4, np.float32)
    _C.step(**args, logits=logits, mass_before=before, mass_after=after, num_threads=2)
    assert args["status"].tolist() == [0, 1, 2, 3]
    z = args["real"][0] - 0.3 * args["noised"][0]
    assert int(args["tokens"][0]) == int(np.argmax(z))  # verdict 0: no bias
    # Input rows may overlap (they are only read): row stride 1 and 0.
    base = np.arange(9, dtype=np.float32)
    for stride in (4, 0):
        ok = _raw(
            real=np.lib.stride_tricks.as_strided(base, (2, 8), (stride, 4)),
            noised=np.lib.stride_tricks.as_strided(base * 0, (2, 8), (stride, 4)),
        )
        _C.step(**ok)
        assert ok["status"].tolist() == [0, 0]
        assert ok["tokens"].tolist() == [7, 7]  # rows 0..7 and 1..8 (or 0..7 twice)
    # bf16 passed as its int16 bits, fp16 directly.
    for dtype, cast in (
        ("bfloat16", lambda a: torch.from_numpy(a).bfloat16().view(torch.int16).numpy()),
        ("float16", lambda a: a.astype(np.float16)),
    ):
        ok = _raw()
        ok.update(real=cast(ok["real"]), noised=cast(ok["noised"]), dtype=dtype)
        _C.step(**ok)
        assert ok["status"].tolist() == [0, 0]
