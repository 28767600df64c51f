"""The Triton kernels compile for sm_90 (H100/H200), on a machine without a GPU.

The interpreter tests (test_step_triton.py) run the kernels' Python semantics; this compiles
them through Triton's whole pipeline (TTIR, TTGIR, LLVM, PTX, ptxas) for every launch
configuration in CONFIGS: the launches come from ``step_triton._launches``, the very keyword
arguments and options ``step_triton`` launches with, so a signature or constexpr mistake is
caught here too.

The compiler runs in a subprocess: a test session that set TRITON_INTERPRET=1 (conftest.py,
without a GPU) has Triton's own library functions (``tl.max``...) defined for the
interpreter, which cannot compile. ``python -m tests.ops.test_triton_compile [ID...]`` is
that subprocess: it prints one JSON line of results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[triton]')")

from safecode_kernels import SteeringParams  # noqa: E402
from safecode_kernels.ops import step_triton  # noqa: E402
from safecode_kernels.ops.step_inputs import prepare_step_inputs  # noqa: E402

if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 4):  # pragma: no cover
    pytest.skip(
        f"compiles through the ASTSource API of triton >= 3.4 (parameters by name), not triton {triton.__version__}'s",
        allow_module_level=True,
    )

REPO = Path(__file__).resolve().parents[2]
# sm_90's largest shared memory per block (227 KiB).
MAX_SHARED = 227 * 1024

_POINTER_TYPES = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.int64: "*i64",
    torch.int32: "*i32",
    torch.int8: "*i8",
    torch.uint8: "*u8",
}
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# id: (B, V, dtype, params, return_logits, return_stats). Every constexpr switch of the two
# main kernels is on in some case and off in another (test_configs_cover_every_switch).
CONFIGS = {
    "greedy-topk20": (1, 32000, "fp32", SteeringParams(), False, False),
    "greedy-plaus-all-logits-stats": (3, 32000, "fp16", SteeringParams(plausibility=0.1, scope="all"), True, True),
    "greedy-k0-tiny-vocab": (2, 7, "bf16", SteeringParams(sensitive_top_k=0), False, True),
    "greedy-large-batch-vocab": (17, 152064, "bf16", SteeringParams(), False, False),
    "temperature-gumbel": (4, 32000, "bf16", SteeringParams(temperature=0.7, sensitive_top_k=0), True, False),
    "top-k": (2, 32000, "fp32", SteeringParams(temperature=1.0, top_k=50), False, True),
    "top-p": (2, 32000, "fp32", SteeringParams(temperature=1.0, top_p=0.9, plausibility=0.1), False, True),
    "top-k-top-p": (8, 128256, "fp16", SteeringParams(temperature=0.6, top_k=20, top_p=0.95), True, False),
}


def _launches(batch, vocab, dtype, params, return_logits, return_stats):
    # CPU tensors stand in for CUDA ones: only their dtypes reach the compiler. (Block sizes
    # follow the GPU heuristics in the subprocess, where the kernels are not interpreted.)
    real = torch.zeros(batch, vocab, dtype=dtype)
    refusal = torch.arange(3, min(vocab, 120), 9)
    inputs = prepare_step_inputs(real, real.clone(), torch.zeros(batch, dtype=torch.int8), refusal, params, 0)
    launches, *_ = step_triton._launches(inputs, return_logits, return_stats)
    return launches


def _signature(fn, args) -> tuple[dict, dict]:
    """``(signature, constexprs)`` of ``fn`` for keyword arguments ``args``, typed as Triton's
    launcher types them (constexprs by value, ints as i32 or i64 by range, floats as fp32)."""
    names = [param.name for param in fn.params]
    assert sorted(names) == sorted(args), f"{fn.__name__}: arguments differ from the kernel's parameters"
    signature, constexprs = {}, {}
    for param in fn.params:
        value = args[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = _POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}.{param.name}: unexpected argument {value!r}")
    return signature, constexprs


def _compile(config_id: str) -> list[dict]:
    """Compile every launch of one config for sm_90 (in a process without TRITON_INTERPRET)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from safecode_kernels.ops import step_triton_kernels as kernels

    batch, vocab, dtype, params, return_logits, return_stats = CONFIGS[config_id]
    results = []
    for launch in _launches(batch, vocab, _DTYPES[dtype], params, return_logits, return_stats):
        fn = getattr(kernels, launch.kernel)
        signature, constexprs = _signature(fn, launch.args)
        compiled = triton.compile(
            ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32), options=dict(launch.options)
        )
        results.append(
            dict(
                kernel=launch.kernel,
                cubin_bytes=len(compiled.asm["cubin"]),
                shared=compiled.metadata.shared,
                num_warps=compiled.metadata.num_warps,
            )
        )
    return results


@pytest.fixture(scope="module")
def compiled():
    """``{config id: {"ok": bool, "kernels" | "error": ...}}`` from one subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.ops.test_triton_compile", *CONFIGS],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines, f"the compile subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("config_id", list(CONFIGS))
def test_kernels_compile_for_sm90(compiled, config_id):
    result = compiled[config_id]
    assert result["ok"], result["error"]
    kernels = [r["kernel"] for r in result["kernels"]]
    assert kernels[-2:] == ["step_block_kernel", "step_merge_kernel"]
    for r in result["kernels"]:
        assert r["cubin_bytes"] > 0, r
        assert r["shared"] <= MAX_SHARED, r


def test_configs_cover_every_switch():
    """Each constexpr flag of the block and merge kernels is on in some CONFIG and off in another."""
    seen: dict[tuple[str, str], set] = {}
    for batch, vocab, dtype, *rest in CONFIGS.values():
        for launch in _launches(batch, vocab, _DTYPES[dtype], *rest):
            for name, value in launch.args.items():
                if isinstance(value, bool):
                    seen.setdefault((launch.kernel, name), set()).add(value)
    assert seen and all(values == {False, True} for values in seen.values()), seen


def main(config_ids: list[str]) -> None:
    results = {}
    for config_id in config_ids:
        try:
            results[config_id] = dict(ok=True, kernels=_compile(config_id))
        except Exception:  # reported by the test of this config
            results[config_id] = dict(ok=False, error=traceback.format_exc())
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:] or list(CONFIGS))
