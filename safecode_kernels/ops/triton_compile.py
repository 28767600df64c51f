"""Ahead-of-time compilation of the Triton step kernels for a GPU target, on any machine.

Every kernel the launcher can compile (:func:`.step_triton.kernel_variants`) goes through
Triton's whole pipeline (TTIR, TTGIR, LLVM, PTX, ptxas) for ``sm_80`` / ``sm_90`` without a
GPU, with the signature, constexprs and alignment attributes of a real launch: the argument
types come from :func:`.step_triton._launches` itself, so a launcher/kernel mismatch fails
here too. :func:`resource_usage` reads registers, spills and shared memory from the cubin
with the ``cuobjdump`` that the Triton wheel bundles.

Run it in a process where ``TRITON_INTERPRET`` is not set (the interpreter replaces Triton's
own library functions, which then cannot compile).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import traceback
from concurrent.futures import ProcessPoolExecutor

import torch

from . import step_triton
from .step_inputs import prepare_step_inputs

__all__ = ["compile_all", "compile_variant", "resource_usage", "tool", "unavailable_reason", "variant_signature"]

_POINTER_TYPES = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.int64: "*i64",
    torch.int32: "*i32",
    torch.int16: "*i16",
    torch.int8: "*i8",
    torch.uint8: "*u8",
}


def unavailable_reason() -> str | None:
    """``None`` when this Triton can compile for NVIDIA targets here, else why not."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError as exc:
        return f"triton with its compiler API is not installed ({exc})"
    try:
        from triton.backends import backends
    except ImportError as exc:  # pragma: no cover - very old triton
        return f"this triton has no backend registry ({exc})"
    if "nvidia" not in backends:
        return f"this triton has no NVIDIA backend (backends: {sorted(backends)})"
    if tool("ptxas") is None:
        return "this triton's NVIDIA backend has no ptxas"
    return None


def tool(name: str) -> str | None:
    """Path of a CUDA tool (``ptxas``, ``cuobjdump``, ``nvdisasm``): the one Triton uses
    (``TRITON_<NAME>_PATH``, else the wheel's ``triton/backends/nvidia/bin``), else PATH."""
    override = os.environ.get(f"TRITON_{name.upper()}_PATH")
    if override and os.access(override, os.X_OK):
        return override
    try:
        import triton.backends.nvidia as nvidia

        bundled = os.path.join(os.path.dirname(nvidia.__file__), "bin", name)
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:  # pragma: no cover - depends on the environment
        pass
    return shutil.which(name)


def _representative_launches() -> dict[str, step_triton._Launch]:
    """One launch of each kernel, from the launcher itself (CPU tensors stand in for CUDA
    ones: only dtypes and values reach the signature)."""
    from ..params import SteeringParams

    found = {}
    for vocab in (4096, 1000):  # aligned rows, then rows of 1000 logits (the "any" twins)
        real = torch.zeros(2, vocab)
        inputs = prepare_step_inputs(
            real, real.clone(), torch.zeros(2, dtype=torch.int8), [3, 9], SteeringParams(plausibility=0.1), 0
        )
        launches, *_ = step_triton._launches(inputs, True, True)
        found.update({launch.kernel: launch for launch in launches})
    return found


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {value!r}")


def variant_signature(variant: step_triton.KernelVariant, fn) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` of ``variant`` for ``ASTSource``: types as the
    launcher's arguments have them (the logits as the variant's dtype), constexprs keyed by
    ``(index,)`` (what every Triton 3.x accepts), and 16-divisibility on every argument the
    kernel is specialised on (the launcher guarantees it; tests/ops check)."""
    launch = _representative_launches()[variant.kernel]
    constexprs = dict(variant.constexprs)
    names = [param.name for param in fn.params]
    if sorted(names) != sorted(launch.args):
        raise AssertionError(f"{variant.kernel}: the launcher's arguments differ from the kernel's parameters")
    signature, by_index, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            by_index[(index,)] = constexprs[param.name]
            continue
        value = launch.args[param.name]
        if param.name in ("zr_ptr", "zn_ptr") and variant.dtype is not None:
            value = torch.empty(0, dtype=variant.dtype)
        signature[param.name] = _arg_type(value)
        specialised = not getattr(param, "do_not_specialize", False)
        if specialised and not isinstance(value, (bool, float)):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, by_index, attrs


def compile_variant(variant: step_triton.KernelVariant, arch: int):
    """Compile one variant for ``sm_<arch>``: Triton's ``CompiledKernel`` (``asm["cubin"]``,
    ``metadata.shared``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import step_triton_kernels as kernels

    fn = getattr(kernels, variant.kernel)
    signature, constexprs, attrs = variant_signature(variant, fn)
    options = dict(num_warps=variant.num_warps, enable_fp_fusion=variant.enable_fp_fusion)
    return triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options
    )


def resource_usage(cubin: bytes) -> dict[str, int]:
    """``{"registers", "spill_stores", "spill_loads", "stack", "shared", "local"}`` of the one
    kernel in ``cubin``, from ``cuobjdump -res-usage`` (bytes, except registers per thread)."""
    cuobjdump = tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found (neither in the Triton wheel nor on PATH)")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([cuobjdump, "-res-usage", file.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    result = {k.lower(): int(v) for k, v in fields.items()}
    result = dict(
        registers=result.get("reg", 0),
        stack=result.get("stack", 0),
        shared=result.get("shared", 0),
        local=result.get("local", 0),
    )
    if spills is None:
        # Older cuobjdump prints no spill line: local memory is where spills go.
        result.update(spill_stores=result["local"], spill_loads=result["local"])
    else:
        result.update(spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)))
    return result


def _compile_one(job: tuple[int, int]) -> dict:
    index, arch = job
    variant = step_triton.kernel_variants()[index]
    try:
        kernel = compile_variant(variant, arch)
        usage = resource_usage(kernel.asm["cubin"])
        return dict(ok=True, dynamic_shared=kernel.metadata.shared, cubin_bytes=len(kernel.asm["cubin"]), **usage)
    except Exception:  # reported per variant by the callers
        return dict(ok=False, error=traceback.format_exc())


def compile_all(archs=(80, 90), workers: int | None = None) -> dict[str, dict]:
    """``{"<variant name>@sm_<arch>": result}`` for every kernel variant and arch, compiled by
    a pool of ``workers`` processes (one per core, at most 4). A result is ``{"ok": True,
    "registers", "spill_stores", "spill_loads", "stack", "local", "shared" (static bytes),
    "dynamic_shared" (bytes), "cubin_bytes"}`` or ``{"ok": False, "error": traceback}``."""
    variants = step_triton.kernel_variants()
    jobs = [(index, arch) for arch in archs for index in range(len(variants))]
    workers = workers or min(4, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(_compile_one, jobs))
    return {f"{variants[index].name}@sm_{arch}": result for (index, arch), result in zip(jobs, results)}
