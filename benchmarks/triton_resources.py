"""Registers, spills and shared memory of every Triton step kernel, for an NVIDIA target,
without a GPU.

Each variant the launcher can compile (``step_triton.kernel_variants``) is compiled with
Triton's own compiler for ``sm_<arch>`` and its cubin read with the ``cuobjdump -res-usage``
that the Triton wheel bundles (triton/backends/nvidia/bin). Nothing runs on a GPU and
nothing is timed; a variant that spills registers to local memory is flagged ``SPILLS``.

    python benchmarks/triton_resources.py [--arch 90] [--workers N] [--out table.md]

Run it without ``TRITON_INTERPRET`` set (the interpreter's kernels cannot compile).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from safecode_kernels.ops import step_triton, triton_compile  # noqa: E402


def _occupancy_note(registers: int, num_warps: int) -> str:
    """Resident blocks per SM by registers alone (64K registers per SM on sm_80 / sm_90)."""
    if registers == 0:
        return ""
    per_block = registers * 32 * num_warps
    return str(65536 // per_block)


def table(arch: int, workers: int | None) -> str:
    import triton

    results = triton_compile.compile_all((arch,), workers)
    lines = [
        f"# Triton step kernels: resources for sm_{arch}",
        "",
        f"Compiled on a CPU machine (no GPU ran) with Triton {triton.__version__} and its bundled ptxas, "
        f"{datetime.date.today().isoformat()}, {platform.machine()}; read with `cuobjdump -res-usage`. "
        "Regs: registers per thread; spills: bytes of spill stores / loads; static shared from the cubin, "
        "dynamic shared from Triton's metadata (bytes); blocks/SM: resident blocks allowed by registers alone.",
        "",
        "| kernel variant | warps | regs | spills (st/ld) | stack | local | static shared | dynamic shared "
        "| blocks/SM (regs) | cubin bytes | flag |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    spilled = 0
    for variant in step_triton.kernel_variants():
        r = results[f"{variant.name}@sm_{arch}"]
        if not r["ok"]:
            lines.append(f"| `{variant.name}` | {variant.num_warps} | compile failed | | | | | | | | FAILED |")
            print(r["error"], file=sys.stderr)
            continue
        spills = r["spill_stores"] or r["spill_loads"] or r["local"]
        spilled += bool(spills)
        blocks = _occupancy_note(r["registers"], variant.num_warps)
        lines.append(
            f"| `{variant.name}` | {variant.num_warps} | {r['registers']} | {r['spill_stores']} / {r['spill_loads']} "
            f"| {r['stack']} | {r['local']} | {r['shared']} | {r['dynamic_shared']} "
            f"| {blocks} | {r['cubin_bytes']} | {'SPILLS' if spills else ''} |"
        )
    lines += ["", f"{len(step_triton.kernel_variants())} variants, {spilled} with spills."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90 (default 90)")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: one per core, <= 4)")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled")
    reason = triton_compile.unavailable_reason()
    if reason is not None:
        parser.error(f"cannot compile for NVIDIA here: {reason}")
    text = table(args.arch, args.workers)
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
