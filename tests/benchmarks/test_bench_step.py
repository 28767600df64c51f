"""benchmarks/bench_step.py: what its timed callables do, checked on the CPU (the Triton
kernels run in Triton's interpreter here, tests/conftest.py)."""

from __future__ import annotations

import collections

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

from safecode_kernels.ops.dispatch import backend_status
from tests.benchmarks import load_script

bench_step = load_script("bench_step")

TRITON_REASON = backend_status()["triton"]


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))


# A host sync: reading a tensor's value on the host (.item(), bool(), int()).
SYNC = "aten._local_scalar_dense.default"


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend unavailable: {TRITON_REASON}")
@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_kernel_timing_has_no_host_sync(mode):
    """The ``kernel`` column times the launches alone: no host sync inside the timed call,
    where the whole op (``op`` column) reads its status words once."""
    case = bench_step.Case(2, 600, "fp32", mode)
    kernel = bench_step.kernel_fn(case, "cpu")
    kernel()  # compiles (interprets) once, outside the count
    with _OpCounter() as counter:
        kernel()
    assert counter.counts[SYNC] == 0
    op = bench_step.step_fn(case, "triton", "cpu")
    with _OpCounter() as counter:
        op()
    assert counter.counts[SYNC] >= 1  # the counter does see the op's sync


@pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton backend unavailable: {TRITON_REASON}")
def test_dry_run_takes_the_gpu_path(tmp_path, capsys):
    """``--device cuda --dry-run`` times the Triton op and its kernel launches (in the
    interpreter) next to torch, and says its times mean nothing; without ``--device cuda`` it is
    a usage error."""
    import json

    out = tmp_path / "step.json"
    assert bench_step.main(["--device", "cuda", "--dry-run", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["dry_run"] is True and data["device"] == "cuda"
    assert [r["case"] for r in data["results"]] == [c.name for c in bench_step.DRY_RUN_CASES]
    assert all(r["fast_backend"] == "triton" and r["kernel_ms"] > 0 for r in data["results"])
    assert all(r["fast_peak_share"] is None for r in data["results"])  # no card, no share of its peak
    assert "These times mean nothing" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench_step.main(["--dry-run"])


def test_floor_and_fixed_cost_cases():
    case = bench_step.Case(1, 64, "bf16", "greedy")
    assert len(bench_step.floor_fns(case)) == 1  # numpy has no bfloat16: torch's reduction only
    assert len(bench_step.floor_fns(bench_step.Case(1, 64, "fp32", "greedy"))) == 2
    small = bench_step.step_fn(bench_step.Case(1, bench_step.FIXED_COST_VOCAB, "fp32", "sample"), "torch")
    assert small().tokens.shape == (1,)


@pytest.mark.parametrize(
    "name, gbps",
    [
        ("NVIDIA H100 80GB HBM3", 3350.0),
        ("NVIDIA H100 PCIe", 2000.0),
        ("NVIDIA H100 NVL", 3900.0),
        ("NVIDIA H200", 4800.0),
        ("NVIDIA A100-SXM4-80GB", 2039.0),
        ("NVIDIA A100 80GB PCIe", 1935.0),
        ("NVIDIA A100-SXM4-40GB", 1555.0),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_peak_bandwidth_by_card_and_form_factor(name, gbps):
    assert bench_step.card_peak_gbps(name) == gbps


def test_batches_option_selects_the_cases(monkeypatch, capsys):
    """``--batches`` runs exactly those batch sizes (what the device check asks for)."""
    ran = []

    def step_fn(case, backend, device="cpu"):
        ran.append(case.batch)
        return lambda: 0

    monkeypatch.setattr(bench_step, "step_fn", step_fn)
    monkeypatch.setattr(bench_step, "floor_fns", lambda case, device="cpu": [lambda: 0])
    monkeypatch.setattr(bench_step, "time_call", lambda fn, *args: 1e-3)
    assert bench_step.main(["--batches", "3", "5", "--quick"]) == 0
    assert set(ran) == {3, 5}  # the fixed cost too runs at each case's batch
    with pytest.raises(SystemExit):
        bench_step.main(["--batches", "0"])
