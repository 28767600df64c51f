"""``safecode_step`` as the registered op ``safecode_kernels::step``: ``torch.compile`` traces
it without a graph break and gives the eager tokens, profiles show it as one event, and the
op called directly checks its inputs like the Python wrapper."""

from __future__ import annotations

import pytest
import torch

import safecode_kernels as sk
from safecode_kernels import SteeringParams, StepError
from safecode_kernels.ops import step_cpu
from safecode_kernels.ops.codes import Scope
from safecode_kernels.ops.step_op import OP_NAME, op_scalars

BACKENDS = ["torch"] + (["cpu"] if step_cpu.unavailable_reason() is None else [])
VOCABULARY = sk.RefusalVocabulary([1, 3, 40, 41])


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    monkeypatch.delenv("SAFECODE_BACKEND", raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _logits(batch=3, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 3, torch.randn(batch, vocab, generator=g) * 3


def _outputs(out):
    mass = out.refusal_mass or (None, None)
    return out.tokens, out.logits, mass[0], mass[1]


def _assert_same(compiled, eager):
    for c, e in zip(_outputs(compiled), _outputs(eager)):
        assert (c is None) == (e is None)
        if c is not None:
            assert c.dtype == e.dtype and c.shape == e.shape
            torch.testing.assert_close(c, e, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("verdict", "refusal"),
    [
        (["unsafe", "safe", "none"], VOCABULARY),
        (torch.tensor([1, -1, 0], dtype=torch.int8), torch.tensor([1, 3, 40, 41])),
        ([sk.Verdict.SAFE, sk.Verdict.SAFE, sk.Verdict.UNSAFE], [2, 7]),
    ],
    ids=["names+vocabulary", "tensors", "verdicts+list"],
)
def test_compiled_matches_eager_without_graph_break(backend, verdict, refusal):
    real, noised = _logits()
    params = SteeringParams(plausibility=0.05, sensitive_top_k=10)

    def step(real, noised):
        return sk.safecode_step(
            real, noised, verdict, refusal, params, backend=backend, return_logits=True, return_stats=True
        )

    explanation = torch._dynamo.explain(step)(real, noised)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    _assert_same(compiled(real, noised), step(real, noised))
    # New values, same shapes: the compiled graph is reused and still right.
    real2, noised2 = _logits(seed=1)
    _assert_same(compiled(real2, noised2), step(real2, noised2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_sampling_with_a_seed_matches_eager(backend):
    real, noised = _logits(batch=4, vocab=64)
    params = SteeringParams(temperature=0.8, top_k=20, top_p=0.9)

    def step(real, noised, seed):
        return sk.safecode_step(
            real, noised, ["unsafe", "safe", "none", "unsafe"], VOCABULARY, params, generator=seed, backend=backend
        ).tokens

    compiled = torch.compile(step, fullgraph=True)
    for seed in (0, 7):
        assert torch.equal(compiled(real, noised, seed), step(real, noised, seed))


def test_compiled_sampling_without_a_generator_uses_torchs_default():
    real, noised = _logits()
    params = SteeringParams(temperature=1.0)

    def step(real, noised):
        return sk.safecode_step(real, noised, ["none"] * 3, VOCABULARY, params).tokens

    compiled = torch.compile(step, fullgraph=True)
    compiled(real, noised)  # compile first: tracing may draw random numbers of its own
    torch.manual_seed(3)
    first = compiled(real, noised)
    torch.manual_seed(3)
    assert torch.equal(step(real, noised), first)


def test_compiled_greedy_default_arguments():
    real, noised = _logits(batch=1, vocab=7)
    refusal = torch.tensor([2])

    def step(real, noised):
        return sk.safecode_step(real, noised, ["unsafe"], refusal).tokens

    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(real, noised), step(real, noised))


def test_compiled_with_inputs_that_need_grad():
    real, noised = _logits()
    real.requires_grad_(True)

    def step(real, noised):
        return sk.safecode_step(real, noised, ["unsafe", "safe", "none"], VOCABULARY, backend="torch").tokens

    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(real, noised), step(real.detach(), noised))


def _step_events(prof):
    return [event for event in prof.events() if event.name == OP_NAME]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_one_profiler_event_named_after_the_op(compiled):
    real, noised = _logits()

    def step(real, noised):
        return sk.safecode_step(real, noised, ["unsafe", "safe", "none"], VOCABULARY, return_stats=True).tokens

    fn = torch.compile(step, fullgraph=True) if compiled else step
    fn(real, noised)  # compile outside the profile
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(real, noised)
    assert len(_step_events(prof)) == 1


def test_errors_are_the_eager_errors_when_compiled():
    real, noised = _logits()
    real[1, 4] = float("nan")

    def step(real, noised):
        return sk.safecode_step(real, noised, ["unsafe", "safe", "none"], VOCABULARY).tokens

    with pytest.raises(StepError, match="logits_real row 1 contains NaN"):
        step(real, noised)
    with pytest.raises(StepError, match="logits_real row 1 contains NaN"):
        torch.compile(step, fullgraph=True)(real, noised)


def _op(real, noised, verdict, refusal, params=None, seed=-1, backend="auto", return_logits=True, return_stats=True):
    params = params or SteeringParams()
    return torch.ops.safecode_kernels.step(
        real, noised, verdict, refusal, *op_scalars(params), seed, backend, return_logits, return_stats
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_op_called_directly(backend):
    real, noised = _logits()
    verdict = torch.tensor([1, -1, 0], dtype=torch.int8)
    ids = torch.tensor([1, 3, 40])
    params = SteeringParams(scope="all")
    tokens, logits, mass = _op(real, noised, verdict, ids, params, backend=backend)
    out = sk.safecode_step(real, noised, verdict, ids, params, backend=backend, return_logits=True, return_stats=True)
    assert torch.equal(tokens, out.tokens)
    assert torch.equal(logits, out.logits)
    assert torch.equal(mass, torch.stack(out.refusal_mass))
    # Outputs that were not asked for are empty.
    tokens, logits, mass = _op(
        real, noised, verdict, ids, params, backend=backend, return_logits=False, return_stats=False
    )
    assert tokens.shape == (3,) and logits.numel() == 0 and mass.numel() == 0


def test_the_op_checks_its_inputs():
    real, noised = _logits()
    with pytest.raises(ValueError, match="unknown verdict value 2 in row 0"):
        _op(real, noised, torch.tensor([2, 0, 0], dtype=torch.int8), torch.tensor([1]))
    with pytest.raises(ValueError, match="refusal ids must be sorted and unique"):
        _op(real, noised, torch.zeros(3, dtype=torch.int8), torch.tensor([4, 1]))
    with pytest.raises(ValueError, match="unknown backend 'fortran'"):
        _op(real, noised, torch.zeros(3, dtype=torch.int8), torch.tensor([1]), backend="fortran")


def test_the_fake_gives_the_output_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        real, noised = torch.empty(5, 11), torch.empty(5, 11)
        verdict, ids = torch.zeros(5, dtype=torch.int8), torch.tensor([1, 2])
        tokens, logits, mass = _op(real, noised, verdict, ids)
        assert (tokens.shape, tokens.dtype) == ((5,), torch.int64)
        assert (logits.shape, logits.dtype) == ((5, 11), torch.float32)
        assert (mass.shape, mass.dtype) == ((2, 5), torch.float32)
        tokens, logits, mass = _op(real, noised, verdict, ids, return_logits=False, return_stats=False)
        assert logits.shape == (0,) and mass.shape == (0,)


def test_opcheck():
    real, noised = _logits()
    args = (
        real,
        noised,
        torch.tensor([1, -1, 0], dtype=torch.int8),
        torch.tensor([1, 3]),
        *op_scalars(SteeringParams()),
        -1,
        "torch",
        True,
        True,
    )
    torch.library.opcheck(torch.ops.safecode_kernels.step.default, args)


def test_scalars_round_trip():
    params = SteeringParams(
        alpha=0.7,
        alpha_safe=0.2,
        real_weight=1.5,
        plausibility=0.1,
        sensitive_top_k=2**70,
        scope="all",
        boost=2.0,
        suppress=float("inf"),
        temperature=0.5,
        top_k=3,
        top_p=0.8,
    )
    scalars = op_scalars(params)
    assert scalars[4] == 2**63 - 1  # a k beyond int64 means the same as k = V
    assert scalars[5] == Scope.ALL
    from safecode_kernels.ops.step_op import _params

    rebuilt = _params(*scalars)
    assert rebuilt == params.replace(sensitive_top_k=2**63 - 1)
