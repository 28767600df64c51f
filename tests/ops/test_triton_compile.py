"""Every Triton kernel the launcher can choose compiles for sm_80 and sm_90, on a machine
without a GPU, and spills no register (safecode_kernels/ops/triton_compile.py).

The plan space is the launcher's own (``step_triton.kernel_variants``); the second half of
this file checks that real launches over a grid of batch sizes, vocabularies, dtypes, modes,
refusal-set sizes and layouts only ever ask for one of those variants, with the alignment the
variant is specialised on.

The compiler runs in a subprocess: a test session that set TRITON_INTERPRET=1 (conftest.py,
without a GPU) has Triton's own library functions (``tl.max``...) defined for the
interpreter, which cannot compile. ``python -m tests.ops.test_triton_compile`` is that
subprocess (a pool of one process per core): it prints one JSON line of results.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[triton]')")

from safecode_kernels import SteeringParams  # noqa: E402
from safecode_kernels.ops import step_triton, triton_compile  # noqa: E402
from safecode_kernels.ops.step_inputs import prepare_step_inputs  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ARCHS = (80, 90)
# Largest shared memory per block: sm_80 163 KiB, sm_90 227 KiB.
MAX_SHARED = {80: 163 * 1024, 90: 227 * 1024}
VARIANTS = step_triton.kernel_variants()
_UNAVAILABLE = triton_compile.unavailable_reason()
needs_compiler = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"cannot compile for NVIDIA: {_UNAVAILABLE}")


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.ops.test_triton_compile"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, f"the compile subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1])


@needs_compiler
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_variant_compiles_without_spills(compiled, variant, arch):
    result = compiled[f"{variant.name}@sm_{arch}"]
    assert result["ok"], result["error"]
    assert result["cubin_bytes"] > 0
    assert result["dynamic_shared"] + result["shared"] <= MAX_SHARED[arch], result
    assert result["spill_stores"] == result["spill_loads"] == result["local"] == 0, f"spills: {result}"


# ----------------------------------------------------------------------------------------
# The launcher only asks for those variants
# ----------------------------------------------------------------------------------------
def _inputs(batch, vocab, dtype, layout, n_ref, params):
    if layout == "sliced":  # rows of a wider tensor, shifted by one logit: unaligned
        real = torch.zeros(batch, vocab + 3, dtype=dtype)[:, 1 : vocab + 1]
    elif layout == "expanded":  # one row broadcast over the batch (stride 0)
        real = torch.zeros(1, vocab, dtype=dtype).expand(batch, vocab)
    else:
        real = torch.zeros(batch, vocab, dtype=dtype)
    refusal = torch.arange(n_ref) * max(1, vocab // max(n_ref, 1)) % vocab
    verdict = torch.zeros(batch, dtype=torch.int8)
    return prepare_step_inputs(real, real.clone(), verdict, refusal.unique(), params, 0)


MODES = {
    "greedy": SteeringParams(),
    "greedy-all-plaus": SteeringParams(scope="all", plausibility=0.1),
    "greedy-k0": SteeringParams(sensitive_top_k=0),
    "T": SteeringParams(temperature=0.7, sensitive_top_k=0),
    "T-k20": SteeringParams(temperature=0.7),
    "tiny-T": SteeringParams(temperature=1e-39),
    "top-k": SteeringParams(temperature=1.0, top_k=50),
    "top-p": SteeringParams(temperature=1.0, top_p=0.9, plausibility=0.1),
    "top-k-top-p": SteeringParams(temperature=0.6, top_k=20, top_p=0.95),
    "k-large": SteeringParams(sensitive_top_k=5000),
}
LAYOUTS = ["contiguous", "sliced", "expanded"]
# Every dtype x layout x mode switch, and every mode x vocabulary x refusal-set size
# (a full product would cost minutes here).
GRID = (
    list(
        itertools.product(
            [1, 5],
            [7, 1000, 152_064, 1_000_000],  # vocabulary (1M: more blocks than NB_MAX)
            ["fp32", "bf16", "fp16"],
            LAYOUTS,
            [0, 150, 5000],  # refusal ids
            ["greedy-k0", "greedy-all-plaus", "top-p"],
        )
    )
    + list(itertools.product([3], [1000, 32_000, 152_064], ["bf16"], LAYOUTS, [0, 24, 150, 5000, 20_000], list(MODES)))
    + [(70_000, 1000, "bf16", "expanded", 24, mode) for mode in MODES]  # > 65535 rows: the grid's x
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _specialised_values(launch) -> dict:
    """The arguments the launched kernel is specialised on (its do_not_specialize lists; the
    interpreter's kernels have no parameter objects, so read the lists themselves)."""
    from safecode_kernels.ops import step_triton_kernels as kernels

    not_specialised = {
        "row_max_kernel": kernels.ROW_MAX_DNS,
        "row_max_kernel_any": kernels.ROW_MAX_DNS + kernels.ROW_MAX_LAYOUT,
        "step_block_kernel": kernels.BLOCK_DNS,
        "step_block_kernel_any": kernels.BLOCK_DNS + kernels.BLOCK_LAYOUT,
        "step_merge_kernel": kernels.MERGE_PARAMS,
    }[launch.kernel]
    return {
        name: value
        for name, value in launch.args.items()
        if name not in not_specialised and name not in step_triton._CONSTEXPRS and not isinstance(value, float)
    }


def test_launches_use_only_the_compiled_variants(monkeypatch):
    """Over the grid, each launch is one of ``kernel_variants`` (the merge for any batch, every
    alignment twin with the alignment it is specialised on), the grids fit CUDA's limits, and
    every variant is used by some step (the plan space is no larger than needed)."""
    monkeypatch.setattr(step_triton, "_interpreted", lambda: False)  # the GPU heuristics
    space = set(VARIANTS)
    used = set()
    sizes = {}
    for batch, vocab, dtype, layout, n_ref, mode in GRID:
        inputs = _inputs(batch, vocab, DTYPES[dtype], layout, min(n_ref, vocab - 1), MODES[mode])
        if not step_triton._plan(inputs).fits:
            sizes.setdefault("torch fallback", set()).add((vocab, n_ref))
            continue
        launches, *_ = step_triton._launches(inputs, True, True)
        for launch in launches:
            variant = step_triton.variant_of(launch)
            assert variant in space, (batch, vocab, dtype, layout, n_ref, mode, variant)
            used.add(variant)
            for name, value in _specialised_values(launch).items():
                number = value.data_ptr() if isinstance(value, torch.Tensor) else value
                assert number % 16 == 0, (variant.name, name, number)
            grid = tuple(launch.grid) + (1,) * (3 - len(launch.grid))
            assert grid[0] < 2**31 and grid[1] <= 65535 and grid[2] <= 65535, (variant.name, grid)
    assert used == space, sorted(v.name for v in space - used)
    # The whole-step fallback is taken for what the kernels cannot take only: more blocks
    # than NB_MAX, whatever the refusal set.
    assert sizes["torch fallback"] == {(1_000_000, n) for n in (0, 150, 5000)}


@pytest.mark.parametrize("vocab", [32_000, 152_064])
@pytest.mark.parametrize("mode", list(MODES))
def test_20000_refusal_ids_compile_the_default_kernels(monkeypatch, vocab, mode):
    """A step with 20000 refusal ids launches exactly the kernels (variants, grids, warps,
    argument types) of a step with a default-sized set of 150: its compile time, registers
    and local memory are those that test_variant_compiles_without_spills measures."""
    monkeypatch.setattr(step_triton, "_interpreted", lambda: False)  # the GPU heuristics
    launched = {}
    for n_ref in (150, 20_000):
        inputs = _inputs(3, vocab, torch.bfloat16, "contiguous", n_ref, MODES[mode])
        assert inputs.refusal_ids.numel() == n_ref
        assert step_triton._plan(inputs).fits  # the kernels take the step, not the reference
        launches, *_ = step_triton._launches(inputs, True, True)
        launched[n_ref] = [
            (
                step_triton.variant_of(launch),
                launch.grid,
                {name: triton_compile._arg_type(value) for name, value in launch.args.items()},
            )
            for launch in launches
        ]
    assert launched[20_000] == launched[150]
    assert all(variant in VARIANTS for variant, *_ in launched[20_000])


def main() -> None:
    print(json.dumps(triton_compile.compile_all(ARCHS)))


if __name__ == "__main__":
    main()
