"""The ``triton`` backend of the step op against the ``torch`` reference (docs/design.md §2).

Without a GPU these tests run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``,
set by ``conftest.py``), which costs milliseconds per program: small vocabularies, a handful
of cases, and several of them split a row over many small blocks on purpose so that the
cross-block merge is what is tested. With a GPU the same tests run on CUDA tensors, and the
``gpu``-marked ones add the full grid (B in {1, 3, 17}, V up to 152064, every dtype, k in
{1, 20, V, V + 5}) and larger sampling checks.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import safecode_kernels as sk
from safecode_kernels import SteeringParams, StepError
from safecode_kernels.ops import step_triton
from safecode_kernels.ops.codes import FALLBACK_FLAG, STATUS_MASK
from safecode_kernels.ops.step_inputs import prepare_step_inputs
from safecode_kernels.ops.step_pending import launch_step
from safecode_kernels.ops.step_torch import top_k_mask

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
_UNAVAILABLE = step_triton.unavailable_reason(DEVICE)
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"the Triton backend is unavailable: {_UNAVAILABLE}")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (the full grid is too slow for the interpreter)")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------
@pytest.fixture
def block(monkeypatch):
    """``block(n)`` splits every row into blocks of ``n`` tokens (0: the heuristics)."""
    return lambda n: monkeypatch.setattr(step_triton, "_FORCE_BLOCK", n)


@pytest.fixture
def fallback_rows(monkeypatch):
    """A list that collects the rows recomputed by the exact fallback path. A test whose
    candidates can decide every row asserts it stays empty: a row recomputed by the reference
    matches it whatever the merge got wrong."""
    rows = []
    original = step_triton._fallback_rows

    def counting(inp, which, *args):
        rows.extend(which.tolist())
        return original(inp, which, *args)

    monkeypatch.setattr(step_triton, "_fallback_rows", counting)
    return rows


def make_logits(batch, vocab, dtype, seed, *, ties=False, banned=0.0, refusal=None):
    """Real and noised logits; ``ties`` draws small integers (many exact ties), ``banned``
    is the fraction of -inf in the real row, and ``refusal`` ids get a lift so that some
    of them land in the sensitive set."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        real = torch.randint(-3, 4, (batch, vocab), generator=g).float()
        noised = torch.randint(-3, 4, (batch, vocab), generator=g).float()
    else:
        real = torch.randn(batch, vocab, generator=g) * 3
        noised = torch.randn(batch, vocab, generator=g) * 3
    if refusal is not None and len(refusal):
        real[:, refusal[::2].cpu()] += 4.0
    if banned:
        real[torch.rand(batch, vocab, generator=g) < banned] = -math.inf
    return real.to(dtype).to(DEVICE), noised.to(dtype).to(DEVICE)


def make_refusal(vocab, count, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randperm(vocab, generator=g)[:count].sort().values.to(DEVICE)


def verdicts(batch):
    """Mixed verdicts: unsafe, safe, none, unsafe, ..."""
    return torch.tensor([(1, -1, 0)[i % 3] for i in range(batch)], dtype=torch.int8, device=DEVICE)


def status_words(real, noised, verdict, refusal, params, generator=None):
    """The merge's raw per-row status words (``RowStatus | FALLBACK_FLAG``), before any row
    is recomputed."""
    pending = launch_step(real, noised, verdict, refusal, params, generator, "triton", True, True)
    return pending.status.tolist()


def both(real, noised, verdict, refusal, params, generator=None):
    kw = dict(generator=generator, return_logits=True, return_stats=True)
    return (
        sk.safecode_step(real, noised, verdict, refusal, params, backend="triton", **kw),
        sk.safecode_step(real, noised, verdict, refusal, params, backend="torch", **kw),
    )


def assert_same(got, want):
    assert torch.equal(got.tokens, want.tokens)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
    for g, w in zip(got.refusal_mass, want.refusal_mass):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def reference_probs(modulated, params):
    """The distribution the reference samples from (its ``_sample``, with probabilities)."""
    logits = modulated.float() / params.temperature
    vocab = logits.shape[1]
    if 0 < params.top_k < vocab:
        logits = logits.masked_fill(~top_k_mask(logits, params.top_k), -math.inf)
    if params.top_p < 1.0:
        ordered, order = torch.sort(logits, dim=1, descending=True, stable=True)
        probs = ordered.softmax(dim=1)
        drop = probs.cumsum(dim=1) - probs >= params.top_p
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), -math.inf)
    return logits.softmax(dim=1)


def chi_square_critical(dof, z=3.719):
    """Upper critical value of chi-square (Wilson-Hilferty; z = 3.719 is p = 1e-4)."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


def assert_drawn_from(tokens, probs):
    """``tokens`` (many draws) are never outside the support of ``probs`` [V] and pass a
    chi-square goodness-of-fit test (cells with small expected counts pooled)."""
    n = tokens.numel()
    counts = torch.bincount(tokens.cpu(), minlength=probs.numel()).double()
    probs = probs.cpu().double()
    assert counts[probs == 0].sum() == 0, "drew a token the reference never samples"
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().reshape(1)])
    exp = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    assert dof >= 1
    assert stat < chi_square_critical(dof), f"chi-square {stat:.1f} over {dof} dof"


# ----------------------------------------------------------------------------------------
# Greedy: tokens, logits and stats against the reference
# ----------------------------------------------------------------------------------------
GREEDY_CASES = [
    # dtype, batch, vocab, block, params, logits options
    pytest.param(torch.float32, 3, 1000, 128, dict(sensitive_top_k=20), dict(), id="fp32-k20-8blocks"),
    pytest.param(
        torch.float16, 1, 4096, 512, dict(sensitive_top_k=1, plausibility=0.1), dict(), id="fp16-k1-plausibility"
    ),
    pytest.param(torch.bfloat16, 3, 1000, 0, dict(sensitive_top_k=1000), dict(), id="bf16-kV"),
    pytest.param(
        torch.float32,
        3,
        1000,
        256,
        dict(scope="all", boost=3.0, suppress=math.inf),
        dict(banned=0.05),
        id="fp32-scope-all-banned-refusal",
    ),
    pytest.param(
        torch.float32, 3, 1000, 64, dict(sensitive_top_k=20, boost=0.0), dict(ties=True), id="fp32-ties-16blocks"
    ),
    pytest.param(torch.float16, 3, 7, 0, dict(sensitive_top_k=12), dict(), id="fp16-V7-k>V"),
    pytest.param(
        torch.float32,
        3,
        1000,
        128,
        dict(alpha=1.0, alpha_safe=0.5, real_weight=2.0, plausibility=0.3, sensitive_top_k=20),
        dict(banned=0.1),
        id="fp32-vcd-like",
    ),
]


@pytest.mark.parametrize("dtype, batch, vocab, block_size, params, logits_options", GREEDY_CASES)
def test_greedy_matches_reference(block, fallback_rows, dtype, batch, vocab, block_size, params, logits_options):
    block(block_size)
    refusal = make_refusal(vocab, min(vocab // 2, 24), seed=vocab)
    real, noised = make_logits(batch, vocab, dtype, seed=batch * vocab, refusal=refusal, **logits_options)
    assert_same(*both(real, noised, verdicts(batch), refusal, SteeringParams(**params)))
    assert not fallback_rows  # every block sends k candidates or more: the merge decides


@pytest.mark.parametrize("k", [1, 20, 90])
def test_sensitive_set_is_torch_topk(block, fallback_rows, k):
    """With distinct values, the refusal tokens that get the bias are exactly those in
    ``torch.topk(z, k)`` (every even id is a refusal token, 8 blocks of 128)."""
    block(128)
    vocab, batch = 1000, 3
    refusal = torch.arange(0, vocab, 2, device=DEVICE)
    real, noised = make_logits(batch, vocab, torch.float32, seed=k)
    unsafe = torch.ones(batch, dtype=torch.int8, device=DEVICE)
    params = SteeringParams(sensitive_top_k=k, boost=1.0)
    z = sk.safecode_step(
        real, noised, unsafe, refusal, params.replace(boost=0.0), backend="torch", return_logits=True
    ).logits
    got = sk.safecode_step(real, noised, unsafe, refusal, params, backend="triton", return_logits=True).logits
    in_topk = torch.zeros_like(z, dtype=torch.bool).scatter(1, torch.topk(z, k, dim=1).indices, True)
    is_refusal = torch.zeros(vocab, dtype=torch.bool, device=DEVICE)
    is_refusal[refusal] = True
    assert torch.equal(got != z, in_topk & is_refusal)
    assert not fallback_rows


def test_large_k_beyond_the_candidates_falls_back_exactly(block, monkeypatch, fallback_rows):
    """A sensitive k larger than the candidates the merge takes is still exact: rows the
    candidates cannot decide are flagged and recomputed."""
    block(128)
    monkeypatch.setattr(step_triton, "MAX_MERGE_LANES", 8 * 16 + 24)  # 16 candidates per block
    vocab, batch = 1000, 3
    refusal = make_refusal(vocab, 24, seed=5)
    real, noised = make_logits(batch, vocab, torch.float32, seed=6, refusal=refusal)
    params = SteeringParams(sensitive_top_k=200)
    assert step_triton._plan(prepare_step_inputs(real, noised, verdicts(batch), refusal, params, None)).k_cand == 16
    assert_same(*both(real, noised, verdicts(batch), refusal, params))
    assert fallback_rows  # the test would prove nothing otherwise


# Plans whose rows one block decides alone: a single block, k = 1 over several blocks (the
# row's best is some block's only candidate), or a tiny last block. The merge must decide them
# (its radix prefix for the k-th candidate can lie below that block's last candidate; the
# decision compares the candidate itself). Sampling with top-k uses unsafe / no verdicts: a
# safe row's suppressed candidate can leave its top-k place to a token no block sent.
DECIDED_CASES = [
    pytest.param(64, 0, SteeringParams(), (1, -1, 0), id="V64-one-block-greedy-k20"),
    pytest.param(64, 0, SteeringParams(temperature=0.8), (1, -1, 0), id="V64-one-block-gumbel-k20"),
    pytest.param(64, 0, SteeringParams(temperature=0.8, top_k=50), (1, 0, 1), id="V64-one-block-top-k50"),
    pytest.param(
        64, 0, SteeringParams(temperature=0.7, top_k=40, top_p=0.8), (1, 0, 1), id="V64-one-block-top-k-top-p"
    ),
    pytest.param(200, 64, SteeringParams(sensitive_top_k=1), (1, -1, 0), id="V200-4-blocks-greedy-k1"),
    pytest.param(200, 64, SteeringParams(temperature=0.9, top_k=1), (1, 0, 1), id="V200-4-blocks-top-k1"),
    pytest.param(130, 64, SteeringParams(temperature=0.8, top_k=30), (1, 0, 1), id="V130-3-blocks-last-of-2"),
]


@pytest.mark.parametrize("vocab, block_size, params, verdict", DECIDED_CASES)
def test_rows_the_candidates_decide_are_decided_by_the_merge(block, fallback_rows, vocab, block_size, params, verdict):
    """No FALLBACK_FLAG in the merge's status words, and its result is the reference's."""
    block(block_size)
    refusal = make_refusal(vocab, 24, seed=vocab)
    real, noised = make_logits(3, vocab, torch.float32, seed=vocab + 1, refusal=refusal)
    verdict = torch.tensor(verdict, dtype=torch.int8, device=DEVICE)
    assert status_words(real, noised, verdict, refusal, params, generator=3) == [0, 0, 0]
    got, want = both(real, noised, verdict, refusal, params, generator=3)
    assert not fallback_rows
    if params.temperature == 0:
        assert_same(got, want)
    else:
        assert torch.equal(got.logits, want.logits)
        probs = reference_probs(want.logits, params)
        assert bool((probs.gather(1, got.tokens[:, None]) > 0).all())
        if params.top_k == 1:
            assert torch.equal(got.tokens, want.tokens)  # one token kept


def test_top_k_beyond_the_candidates_falls_back_exactly(block, monkeypatch, fallback_rows):
    """A sampling top-k larger than the candidates (16 per block): the merge flags every row
    (it cannot see the k-th token) and the reference recomputes it."""
    block(128)
    monkeypatch.setattr(step_triton, "MAX_MERGE_LANES", 8 * 16 + 24)  # 16 candidates per block
    vocab, batch = 1000, 3
    refusal = make_refusal(vocab, 24, seed=7)
    real, noised = make_logits(batch, vocab, torch.float32, seed=8, refusal=refusal)
    params = SteeringParams(temperature=0.9, top_k=200)
    assert step_triton._plan(prepare_step_inputs(real, noised, verdicts(batch), refusal, params, None)).k_cand == 16
    words = status_words(real, noised, verdicts(batch), refusal, params, generator=4)
    assert [w & FALLBACK_FLAG for w in words] == [FALLBACK_FLAG] * batch
    assert [w & STATUS_MASK for w in words] == [0] * batch
    got, want = both(real, noised, verdicts(batch), refusal, params, generator=4)
    assert sorted(fallback_rows) == list(range(batch))
    assert torch.equal(got.logits, want.logits)
    for g, w in zip(got.refusal_mass, want.refusal_mass):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    assert bool((reference_probs(want.logits, params).gather(1, got.tokens[:, None]) > 0).all())


def test_suppressed_candidate_falls_back_exactly(block, fallback_rows):
    """A safe row whose best token is a refusal token in the sensitive top-3, suppressed: the
    top-3 it samples from then holds the 4th token, which no block sent (one block of 16,
    3 candidates). The merge flags the row; the reference recomputes it."""
    block(16)
    real = torch.linspace(5.0, 0.0, 16, device=DEVICE).repeat(2, 1)  # token i ranks i-th
    noised = torch.zeros_like(real)
    refusal = torch.tensor([0], device=DEVICE)
    verdict = torch.tensor([-1, 1], dtype=torch.int8, device=DEVICE)  # safe: suppressed; unsafe: boosted
    params = SteeringParams(temperature=1.0, top_k=3, sensitive_top_k=3, suppress=50.0)
    assert step_triton._plan(prepare_step_inputs(real, noised, verdict, refusal, params, None)).k_cand == 3
    assert status_words(real, noised, verdict, refusal, params, generator=5) == [FALLBACK_FLAG, 0]
    got, want = both(real, noised, verdict, refusal, params, generator=5)
    assert fallback_rows == [0]
    assert torch.equal(got.logits, want.logits)
    assert got.tokens[0].item() in (1, 2, 3) and got.tokens[1].item() in (0, 1, 2)


def test_strided_rows_and_optional_outputs(block, fallback_rows):
    block(256)
    refusal = make_refusal(1000, 10, seed=1)
    real, noised = make_logits(6, 1000, torch.float16, seed=2, refusal=refusal)
    real, noised = real[::2], noised[1::2]  # row strides of 2 rows
    assert_same(*both(real, noised, verdicts(3), refusal, SteeringParams()))
    assert not fallback_rows
    out = sk.safecode_step(real, noised, verdicts(3), refusal, SteeringParams(), backend="triton")
    assert out.logits is None and out.refusal_mass is None
    assert out.tokens.dtype == torch.int64 and out.tokens.device == real.device


def test_no_refusal_tokens(block, fallback_rows):
    block(256)
    real, noised = make_logits(3, 1000, torch.float32, seed=3)
    empty = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    got, want = both(real, noised, verdicts(3), empty, SteeringParams())
    assert_same(got, want)
    assert not fallback_rows
    assert torch.equal(got.refusal_mass[0], torch.zeros(3, device=DEVICE))


# ----------------------------------------------------------------------------------------
# Large refusal sets: the kernels take them (no reference pass), up to every token
# ----------------------------------------------------------------------------------------
@pytest.fixture
def reference_calls(monkeypatch):
    """The rows of every call the launcher makes to the torch reference (a whole step the
    kernels cannot take, or rows they flagged)."""
    calls = []
    original = step_triton.step_torch

    def counting(inp, *args):
        calls.append(inp.batch)
        return original(inp, *args)

    monkeypatch.setattr(step_triton, "step_torch", counting)
    return calls


LARGE_REFUSAL_MODES = {
    "greedy-k20": SteeringParams(sensitive_top_k=20),
    "greedy-all": SteeringParams(scope="all", boost=2.0),
    "greedy-k0-plausibility": SteeringParams(sensitive_top_k=0, plausibility=0.05),
    "T-k20": SteeringParams(temperature=0.8, sensitive_top_k=20),
    "T-all": SteeringParams(temperature=0.8, scope="all"),
    "top-k": SteeringParams(temperature=0.9, top_k=50, sensitive_top_k=20),
    "top-p": SteeringParams(temperature=1.0, top_p=0.9, sensitive_top_k=20),
    "top-k-top-p-all": SteeringParams(temperature=0.7, top_k=40, top_p=0.8, scope="all"),
}


@pytest.mark.parametrize("n_ref", [3000, 5000])
@pytest.mark.parametrize("mode", list(LARGE_REFUSAL_MODES))
def test_large_refusal_set_matches_reference(block, reference_calls, mode, n_ref):
    """V = 5000 in 5 blocks with 3000 refusal ids or every id: logits bitwise equal to the
    reference's, masses to rounding, greedy tokens equal, sampled tokens inside the
    reference's kept set, and no row handed to the reference."""
    block(1024)
    vocab, batch = 5000, 3
    params = LARGE_REFUSAL_MODES[mode]
    refusal = make_refusal(vocab, n_ref, seed=n_ref)
    real, noised = make_logits(batch, vocab, torch.float32, seed=n_ref + 1, refusal=refusal)
    got, want = both(real, noised, verdicts(batch), refusal, params, generator=17)
    assert torch.equal(got.logits, want.logits)
    for g, w in zip(got.refusal_mass, want.refusal_mass):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    if params.temperature == 0:
        assert torch.equal(got.tokens, want.tokens)
    else:
        probs = reference_probs(want.logits, params)
        assert bool((probs.gather(1, got.tokens[:, None]) > 0).all())
    assert not reference_calls


def test_sampling_distribution_with_most_tokens_refusal(block, reference_calls):
    """Gumbel-max over 2 blocks where 20 of 24 tokens are refusal tokens and the sensitive
    top-4 decides which are biased (the merge finishes those): the draws follow the
    reference's distribution."""
    block(16)
    n = 100_000 if HAS_CUDA else 200
    refusal = tuple(i for i in range(24) if i % 6)
    params = SteeringParams(temperature=0.7, sensitive_top_k=4, boost=1.5)
    tokens, probs = _draws(n, 24, params, refusal=refusal)
    assert_drawn_from(tokens, probs)
    assert not reference_calls


# ----------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------
def _draws(n, vocab, params, *, seed=0, refusal=(1, 4)):
    """``n`` draws from one row (the row repeated ``n`` times in one call), and the
    reference's distribution for it."""
    real, noised = make_logits(1, vocab, torch.float32, seed=11)
    real, noised = real.expand(n, vocab), noised.expand(n, vocab)
    refusal = torch.tensor(refusal, device=DEVICE)
    unsafe = torch.ones(n, dtype=torch.int8, device=DEVICE)
    out = sk.safecode_step(real / 2, noised / 2, unsafe, refusal, params, generator=seed, backend="triton")
    modulated = sk.safecode_step(
        real[:1] / 2, noised[:1] / 2, unsafe[:1], refusal, params, backend="torch", return_logits=True
    ).logits
    return out.tokens, reference_probs(modulated, params)[0]


def test_temperature_sampling_distribution(block, fallback_rows):
    """Gumbel-max over 2 blocks draws from softmax(z' / T) (scope "all": the bias moves the
    refusal tokens' mass, which the draws must follow)."""
    block(16)
    n = 100_000 if HAS_CUDA else 500
    tokens, probs = _draws(n, 20, SteeringParams(temperature=0.7, scope="all", boost=1.5), refusal=(1, 17))
    assert_drawn_from(tokens, probs)
    assert not fallback_rows


def test_top_k_top_p_sampling_distribution(block, fallback_rows):
    """Top-k then top-p over candidates from 2 blocks: the kept set and its renormalised
    distribution are the reference's."""
    block(16)
    n = 100_000 if HAS_CUDA else 250
    params = SteeringParams(temperature=0.8, top_k=8, top_p=0.85, sensitive_top_k=4)
    tokens, probs = _draws(n, 24, params)
    assert_drawn_from(tokens, probs)
    assert not fallback_rows


def test_sampled_tokens_stay_in_the_kept_set(block, monkeypatch, fallback_rows):
    """Over many configurations, including rows whose nucleus is wider than the candidates
    (forced by a tiny candidate budget: those rows fall back to the exact path)."""
    block(16)
    monkeypatch.setattr(step_triton, "TOP_P_LANES", 16)
    vocab, batch = 60, 8
    refusal = make_refusal(vocab, 6, seed=9)
    real, noised = make_logits(batch, vocab, torch.bfloat16, seed=9, refusal=refusal)
    real, noised = real / 4, noised / 4  # flat: wide nuclei
    for temperature, top_k, top_p in [(1.0, 0, 0.9), (0.5, 3, 1.0), (2.0, 25, 0.5), (1.0, vocab + 3, 0.95)]:
        params = SteeringParams(temperature=temperature, top_k=top_k, top_p=top_p, sensitive_top_k=2)
        got, want = both(real, noised, verdicts(batch), refusal, params, generator=123)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
        probs = reference_probs(want.logits, params)
        assert bool((probs.gather(1, got.tokens[:, None]) > 0).all()), params
    assert fallback_rows  # some nuclei were wider than the candidates


def test_same_seed_same_tokens(fallback_rows):
    refusal = make_refusal(300, 10, seed=4)
    real, noised = make_logits(6, 300, torch.float16, seed=4, refusal=refusal)
    real, noised = real / 8, noised / 8  # flat, so that different seeds give different tokens
    # Unsafe and no verdicts: a safe row's suppressed candidate can hand its top-k place to a
    # token no block sent, and such a row would be the reference's draw, not the kernels'.
    unsafe_or_none = torch.tensor([1, 0, 1, 0, 1, 0], dtype=torch.int8, device=DEVICE)
    for params in (SteeringParams(temperature=1.0, scope="all"), SteeringParams(temperature=1.0, top_k=50, top_p=0.9)):

        def run(generator, params=params):
            return sk.safecode_step(
                real, noised, unsafe_or_none, refusal, params, generator=generator, backend="triton"
            ).tokens

        first = run(2024)
        assert torch.equal(first, run(2024))
        assert not torch.equal(first, run(2025))
    # A torch.Generator in the same state gives the same seed, hence the same tokens.
    assert torch.equal(run(torch.Generator().manual_seed(7)), run(torch.Generator().manual_seed(7)))
    assert not fallback_rows


# ----------------------------------------------------------------------------------------
# Errors: the reference's StepError, naming the same row
# ----------------------------------------------------------------------------------------
def _error_case(name):
    vocab = 64
    real, noised = make_logits(3, vocab, torch.float32, seed=8)
    refusal = torch.tensor([3, 9], device=DEVICE)
    params = SteeringParams()
    if name == "nan-real":
        real[2, 5] = math.nan
    elif name == "inf-noised":
        noised[1, 60] = math.inf
        real[2, 0] = math.nan  # logits_real is checked first: row 2 is named
    elif name == "all-banned":
        real[1] = -math.inf
    elif name == "contrast-overflow":
        real[2, 7] = 3e38
        params = SteeringParams(real_weight=2.0)
    elif name == "banned-after-bias":
        noised[1] = -math.inf  # row 1 (safe): only the refusal tokens survive the contrast ...
        noised[1, refusal] = 0.0
        params = SteeringParams(scope="all", suppress=math.inf)  # ... and the bias bans them
    elif name == "bias-overflow":
        real[0, 9] = 3.4e38
        params = SteeringParams(scope="all", boost=1e38, alpha=0.0)
    elif name == "banned-after-bias-sensitive":  # the merge biases the sensitive refusal tokens
        noised[1] = -math.inf
        noised[1, refusal] = 0.0
        params = SteeringParams(sensitive_top_k=2, suppress=math.inf)
    elif name == "bias-overflow-sensitive":
        real[0, 9] = 3.4e38
        params = SteeringParams(sensitive_top_k=1, boost=1e38, alpha=0.0)
    return real, noised, verdicts(3), refusal, params


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy
@pytest.mark.parametrize(
    "name",
    [
        "nan-real",
        "inf-noised",
        "all-banned",
        "contrast-overflow",
        "banned-after-bias",
        "bias-overflow",
        "banned-after-bias-sensitive",
        "bias-overflow-sensitive",
    ],
)
def test_errors_match_reference(block, name):
    block(16)
    args = _error_case(name)
    with pytest.raises(StepError) as want:
        sk.safecode_step(*args, backend="torch")
    with pytest.raises(StepError) as got:
        sk.safecode_step(*args, backend="triton")
    assert str(got.value) == str(want.value)


def test_unavailable_reason():
    assert step_triton.unavailable_reason(DEVICE) is None
    assert "meta" in step_triton.unavailable_reason(torch.device("meta"))


# ----------------------------------------------------------------------------------------
# GPU: the full grid
# ----------------------------------------------------------------------------------------
def _grid():
    """B x V x dtype x k, each case with a scope and a plausibility setting that alternate so
    that every pair of those meets every size."""
    cases = []
    for index, (batch, vocab, dtype, k) in enumerate(
        itertools.product((1, 3, 17), (7, 1000, 32000, 152064), DTYPES, ("1", "20", "V", "V+5"))
    ):
        scope, plausibility = ("sensitive", "all")[index % 2], (0.0, 0.1)[(index // 2) % 2]
        case_id = f"B{batch}-V{vocab}-{str(dtype)[6:]}-k{k}-{scope}-beta{plausibility}"
        cases.append(pytest.param(index, batch, vocab, dtype, k, scope, plausibility, id=case_id))
    return cases


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("index, batch, vocab, dtype, k, scope, plausibility", _grid())
def test_gpu_greedy_grid(fallback_rows, index, batch, vocab, dtype, k, scope, plausibility):
    k = {"1": 1, "20": 20, "V": vocab, "V+5": vocab + 5}[k]
    refusal = make_refusal(vocab, min(vocab // 2, 64), seed=vocab)
    real, noised = make_logits(batch, vocab, dtype, seed=index, refusal=refusal, banned=0.01 * (index % 3 == 0))
    params = SteeringParams(sensitive_top_k=k, scope=scope, plausibility=plausibility)
    assert_same(*both(real, noised, verdicts(batch), refusal, params))
    assert not fallback_rows  # k <= the candidates of every block: the merge decides


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("vocab", [1000, 32000, 152064])
@pytest.mark.parametrize("mode", ["temperature", "top_k", "top_p", "top_k+top_p"])
def test_gpu_sampling_grid(vocab, mode):
    """Sampled tokens stay in the kept set at real vocabulary sizes, logits match, and the
    same seed repeats (17 rows, flat logits so that nuclei are wide)."""
    batch = 17
    params = {
        "temperature": SteeringParams(temperature=0.9),
        "top_k": SteeringParams(temperature=0.9, top_k=50),
        "top_p": SteeringParams(temperature=1.0, top_p=0.9),
        "top_k+top_p": SteeringParams(temperature=1.0, top_k=200, top_p=0.8),
    }[mode]
    refusal = make_refusal(vocab, 64, seed=vocab)
    for dtype in DTYPES:
        real, noised = make_logits(batch, vocab, dtype, seed=vocab, refusal=refusal)
        real, noised = real / 3, noised / 3
        got, want = both(real, noised, verdicts(batch), refusal, params, generator=99)
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
        probs = reference_probs(want.logits, params)
        assert bool((probs.gather(1, got.tokens[:, None]) > 0).all())
        again = sk.safecode_step(real, noised, verdicts(batch), refusal, params, generator=99, backend="triton")
        assert torch.equal(got.tokens, again.tokens)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("vocab", [32000, 152064])
@pytest.mark.parametrize("n_ref", ["20000", "V"])
@pytest.mark.parametrize("mode", list(LARGE_REFUSAL_MODES))
def test_gpu_large_refusal_sets(reference_calls, vocab, n_ref, mode):
    """20000 refusal ids or every id at real vocabulary sizes, bf16: the kernels take the
    step, greedy matches, sampled tokens stay in the kept set. (Top-p nuclei of these random
    rows can be wider than the candidates: those rows alone may be recomputed.)"""
    batch = 17
    params = LARGE_REFUSAL_MODES[mode]
    refusal = make_refusal(vocab, 20_000 if n_ref == "20000" else vocab, seed=vocab)
    real, noised = make_logits(batch, vocab, torch.bfloat16, seed=vocab, refusal=refusal)
    assert step_triton._plan(prepare_step_inputs(real, noised, verdicts(batch), refusal, params, None)).fits
    got, want = both(real, noised, verdicts(batch), refusal, params, generator=7)
    if params.temperature == 0:
        assert_same(got, want)
    else:
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)
        probs = reference_probs(want.logits, params)
        assert bool((probs.gather(1, got.tokens[:, None]) > 0).all())
    if params.top_p == 1.0:
        assert not reference_calls


@pytest.mark.gpu
@needs_cuda
def test_gpu_top_p_distribution_large_vocab(fallback_rows):
    """Top-p alone at V = 152064 (the nucleus comes from candidates of many blocks)."""
    n, vocab = 20_000, 152064
    real, noised = make_logits(1, vocab, torch.bfloat16, seed=21)
    real[0, :30] += 12.0  # a nucleus of a few tens of tokens spread over the first block
    real[0, 100_000:100_030] += 12.0  # ... and a far block
    params = SteeringParams(temperature=1.0, top_p=0.9, scope="all")
    refusal = torch.tensor([5, 100_005], device=DEVICE)
    unsafe = torch.ones(n, dtype=torch.int8, device=DEVICE)
    out = sk.safecode_step(
        real.expand(n, vocab), noised.expand(n, vocab), unsafe, refusal, params, generator=5, backend="triton"
    )
    modulated = sk.safecode_step(real, noised, unsafe[:1], refusal, params, backend="torch", return_logits=True).logits
    assert_drawn_from(out.tokens, reference_probs(modulated, params)[0])
    assert not fallback_rows
