"""Microbenchmark of the fused step op: the fused kernel (``cpu`` on the CPU, ``triton`` on a
CUDA GPU) against the naive ``torch`` backend on the same device.

Cases: B in {1, 16, 64} x V in {32000, 152064} x fp32 / bf16 x greedy / sampling
(temperature 0.7, top-k 50, top-p 0.9), default steering (alpha 0.3, k = 20, scope
"sensitive"), mixed verdicts, 64 refusal tokens, passed the way a decoder passes them (an int8
verdict tensor, a ``RefusalVocabulary``). Every case reports, measured in the same run:
- the time of both backends and their ratio (torch / fused);
- the fused op's fixed cost: its time for the same case at V = 7, where almost nothing is read
  (on the CPU the least of 5 medians of 200 calls);
- the read floor: a max-reduction over both input rows (``torch.maximum(real, noised).max()``,
  and numpy's ``np.maximum(a, b).max()`` for fp32, the faster of the two), the least any step
  must do, and the fused op's ratio to it;
- the fused op's effective bandwidth: the bytes of both input rows (2 * B * V * itemsize) per
  second, and on the GPU its share of the card's peak.
On the GPU (``--device cuda``) the fused op is also timed as ``kernel``: its launches alone on
inputs prepared once, without input checks or the read of the status words (the op's one
host sync), next to ``op``, the whole call. GPU times come from ``triton.testing.do_bench``,
which flushes the L2 cache before every run. Nothing here asserts a time.

Two ways to run it:

    python -m pytest benchmarks/bench_step.py            # pytest-benchmark, one group per case,
                                                         # and a ratio table at the end
    python benchmarks/bench_step.py [--quick] [--device cuda] [--threads N] [--json out.json]
                                                         # a markdown table
    python benchmarks/bench_step.py --device cuda --dry-run
                                                         # the GPU code path on the CPU

``--dry-run`` runs what ``--device cuda`` runs (the ``triton`` op and its ``kernel`` column next
to ``torch``) on CPU tensors, the kernels in Triton's interpreter, for a few tiny cases timed
on the host: it checks that the GPU benchmark runs end to end; its times mean nothing.

Both backends use torch's thread count (``--threads``, or ``SAFECODE_BENCH_THREADS`` under
pytest). On a machine shared with other work, OpenMP threads that wait for a busy core can
turn a 1 ms step into 20+ ms for *both* backends; the header prints the load average, and
``--threads 1`` gives stable single-core numbers there.

The benchmarks live outside ``tests/`` (the project's testpaths), so plain ``pytest`` never
runs them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import sys
import time

import torch

import safecode_kernels as sk
from safecode_kernels.ops.dispatch import backend_status

# The naive baseline and the fused kernel of each device.
BACKENDS = {"cpu": ("torch", "cpu"), "cuda": ("torch", "triton")}
# Peak memory bandwidth (GB/s) by card and form factor, from NVIDIA's data sheets; matched
# against torch.cuda.get_device_name() in this order, most specific first ("NVIDIA H100 80GB
# HBM3" is the SXM card, "NVIDIA H100 PCIe" the PCIe one).
PEAK_GBPS = (
    (("H200",), 4800.0),  # SXM and NVL
    (("H100", "NVL"), 3900.0),
    (("H100", "PCIe"), 2000.0),
    (("H100",), 3350.0),  # SXM5
    (("H800", "PCIe"), 2000.0),
    (("H800",), 3350.0),
    (("A100", "80GB", "PCIe"), 1935.0),
    (("A100", "80GB"), 2039.0),  # SXM4
    (("A100",), 1555.0),  # 40 GB, SXM4 and PCIe
    (("L40S",), 864.0),
    (("A10G",), 600.0),
)
BATCHES = (1, 16, 64, 256)
VOCABS = (32000, 152064)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = {
    "greedy": sk.SteeringParams(),
    "sample": sk.SteeringParams(temperature=0.7, top_k=50, top_p=0.9),
}
NUM_REFUSAL = 64


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    vocab: int
    dtype: str
    mode: str

    @property
    def name(self) -> str:
        return f"B={self.batch} V={self.vocab} {self.dtype} {self.mode}"

    @property
    def id(self) -> str:
        return f"B{self.batch}-V{self.vocab}-{self.dtype}-{self.mode}"

    @property
    def input_bytes(self) -> int:
        """Bytes of both input rows of every request: what one step must read."""
        return 2 * self.batch * self.vocab * DTYPES[self.dtype].itemsize


CASES = [Case(b, v, d, m) for b in BATCHES for v in VOCABS for d in DTYPES for m in MODES]
QUICK_CASES = [c for c in CASES if c.batch in (1, 16)]
#: ``--dry-run``'s cases: small enough for Triton's interpreter, two vocabulary blocks.
DRY_RUN_CASES = [Case(b, 2600, "fp32", m) for b in (1, 2) for m in MODES]


FIXED_COST_VOCAB = 7  # the fixed cost: a step that reads almost nothing


@functools.lru_cache(maxsize=4)
def make_inputs(batch: int, vocab: int, dtype: str, device: str = "cpu"):
    """Logit rows like a model's: the noised branch correlated with the real one; the
    verdicts and refusal set as a decoder passes them (int8 tensor, ``RefusalVocabulary``)."""
    g = torch.Generator().manual_seed(batch * 1_000_003 + vocab)
    real = torch.randn(batch, vocab, generator=g) * 3.0
    noised = 0.8 * real + 0.6 * torch.randn(batch, vocab, generator=g) * 3.0
    verdict = torch.tensor([(1, -1, 0)[i % 3] for i in range(batch)], dtype=torch.int8)
    refusal = sk.RefusalVocabulary(torch.randperm(vocab, generator=g)[: min(NUM_REFUSAL, vocab // 2)].tolist())
    to = dict(device=device, dtype=DTYPES[dtype])
    return real.to(**to).contiguous(), noised.to(**to).contiguous(), verdict.to(device), refusal


def step_fn(case: Case, backend: str, device: str = "cpu"):
    """A zero-argument callable doing one step of ``case`` on ``backend``."""
    real, noised, verdict, refusal = make_inputs(case.batch, case.vocab, case.dtype, device)
    params = MODES[case.mode]
    return functools.partial(sk.safecode_step, real, noised, verdict, refusal, params, generator=1234, backend=backend)


def floor_fns(case: Case, device: str = "cpu") -> list:
    """Zero-argument callables of the read floor of ``case``: a max-reduction over both input
    rows (torch, and numpy for fp32 on the CPU)."""
    real, noised, _, _ = make_inputs(case.batch, case.vocab, case.dtype, device)
    fns = [lambda: torch.maximum(real, noised).max()]
    if device == "cpu" and real.dtype == torch.float32:
        import numpy as np

        a, b = real.numpy(), noised.numpy()
        fns.append(lambda: np.maximum(a, b).max())
    return fns


def kernel_fn(case: Case, device: str = "cuda"):
    """The fused op's launches alone (``--device cuda``): inputs prepared and launches planned
    once, no input check and no read of the status words in the call, so no host sync."""
    from safecode_kernels.ops import step_triton, step_triton_kernels
    from safecode_kernels.ops.step_inputs import prepare_step_inputs

    real, noised, verdict, refusal = make_inputs(case.batch, case.vocab, case.dtype, device)
    inputs = prepare_step_inputs(real, noised, verdict, refusal, MODES[case.mode], 1234)
    launches = step_triton._launches(inputs, False, False)[0]
    compiled = [(getattr(step_triton_kernels, launch.kernel)[launch.grid], launch) for launch in launches]

    def run():
        for kernel, launch in compiled:
            kernel(**launch.args, **launch.options)

    return run


def peak_gbps(device: str) -> float | None:
    """The card's peak memory bandwidth, where known."""
    if device != "cuda":
        return None
    return card_peak_gbps(torch.cuda.get_device_name())


def card_peak_gbps(name: str) -> float | None:
    """The peak of the card ``name`` (as ``torch.cuda.get_device_name()`` spells it), or ``None``."""
    lowered = name.lower()
    return next((gbps for words, gbps in PEAK_GBPS if all(w.lower() in lowered for w in words)), None)


def machine_description(device: str = "cpu") -> str:
    if device == "cuda":
        return (
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"Python {platform.python_version()}"
        )
    processor = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        processor = model or processor
    except OSError:
        pass
    load = ""
    if hasattr(os, "getloadavg"):  # other work on the machine skews the times: say how much
        load = ", load average {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg())
    return (
        f"{processor or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__} (threads: {torch.get_num_threads()}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}{load}"
    )


def read_bandwidth(megabytes: int = 256) -> float:
    """A rough ceiling to compare with: GB/s of torch summing a buffer far larger than cache."""
    x = torch.ones(megabytes * (1 << 20) // 4, dtype=torch.float32)
    x.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / min(times) / 1e9


# ------------------------------------------------------------------------------------------
# pytest-benchmark mode

try:
    import pytest
except ImportError:  # pragma: no cover - script mode needs no pytest
    pytest = None

if pytest is not None:
    _DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    _PAIRS = [(c, b) for c in CASES for b in BACKENDS[_DEVICE]]

    # Both backends of a case side by side, so that they run on the same (cached) inputs.
    @pytest.mark.parametrize("case,backend", _PAIRS, ids=[f"{c.id}-{b}" for c, b in _PAIRS])
    def test_step(benchmark, bench_results, case, backend):
        threads = os.environ.get("SAFECODE_BENCH_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        reason = backend_status().get(backend)
        if reason is not None:
            pytest.skip(f"{backend} backend unavailable: {reason}")
        fn = step_fn(case, backend, _DEVICE)
        if _DEVICE == "cuda":  # pytest-benchmark's clock needs the GPU work finished
            fn = functools.partial(_synchronized, fn)
        fn()  # warm up (first-call allocations, kernel compilation, thread pool start)
        benchmark.group = case.name
        benchmark.extra_info["input_bytes"] = case.input_bytes
        benchmark(fn)
        if benchmark.stats is not None:  # None under --benchmark-disable
            bench_results.setdefault(case, {})[backend] = benchmark.stats.stats.mean

    def _synchronized(fn):
        fn()
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------
# Script mode


def time_call(fn, min_time: float, min_reps: int, max_reps: int) -> float:
    """Median seconds per call of ``fn`` (after one warm-up call); at least ``min_reps``
    calls, more until ``min_time`` seconds have passed or ``max_reps`` calls were made."""
    fn()
    times: list[float] = []
    total = 0.0
    while len(times) < min_reps or (total < min_time and len(times) < max_reps):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        total += elapsed
    return statistics.median(times)


def time_gpu(fn) -> float:
    """Median seconds per call on the GPU, with the L2 cache flushed before every call."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def format_table(rows: list[dict], fast: str) -> str:
    kernel = any(r.get("kernel_ms") is not None for r in rows)
    lines = [
        f"| case | torch ms | {fast} ms | ratio torch/{fast} | {fast} fixed µs (V = 7) | read floor ms | "
        f"{fast}/floor |{' kernel ms |' if kernel else ''} {fast} GB/s | % of peak | torch GB/s |",
        "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if kernel else "") + "---:|---:|---:|",
    ]
    for r in rows:
        share = f"{r['fast_peak_share'] * 100:.0f}%" if r["fast_peak_share"] is not None else "-"
        kernel_cell = f" {r['kernel_ms']:.3f} |" if kernel else ""
        lines.append(
            f"| {r['case']} | {r['torch_ms']:.3f} | {r['fast_ms']:.3f} | {r['ratio']:.1f}x | "
            f"{r['fixed_us']:.1f} | {r['floor_ms']:.3f} | {r['floor_ratio']:.2f}x |{kernel_cell} "
            f"{r['fast_gbps']:.1f} | {share} | {r['torch_gbps']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="B in {1, 16} only, and shorter timing loops")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu: torch vs the C++ kernel; cuda: torch vs the Triton kernel",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch / OpenMP threads for both CPU backends (default: torch's default)",
    )
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        metavar="B",
        help=f"batch sizes to run (default {' '.join(map(str, BATCHES))}; with --quick 1 16)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="with --device cuda: its code path on CPU tensors (Triton's interpreter, tiny cases); times mean nothing",
    )
    args = parser.parse_args(argv)
    if args.batches is not None and any(b < 1 for b in args.batches):
        parser.error(f"--batches must be >= 1, got {args.batches}")
    if args.dry_run and args.device != "cuda":
        parser.error("--dry-run runs the --device cuda code path: add --device cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dry_run:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("--dry-run: Triton was imported without TRITON_INTERPRET=1 in this process", file=sys.stderr)
            return 1
        os.environ["TRITON_INTERPRET"] = "1"  # read when Triton is first imported (below)
    elif args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 1

    naive, fast = BACKENDS[args.device]
    if args.dry_run:  # no CUDA device, on purpose: Triton need only import (it interprets)
        import importlib.util

        reason = None if importlib.util.find_spec("triton") else "Triton is not installed"
    else:
        reason = backend_status()[fast]
    if reason is not None:
        print(f"the {fast} backend is unavailable: {reason}", file=sys.stderr)
        return 1
    cases = QUICK_CASES if args.quick else CASES
    if args.batches is not None:
        cases = [Case(b, v, d, m) for b in args.batches for v in VOCABS for d in DTYPES for m in MODES]
    min_time, min_reps, max_reps = (0.3, 3, 200) if args.quick else (1.0, 5, 1000)
    device = args.device  # where the tensors live
    if args.dry_run:
        cases, device, min_time, min_reps, max_reps = DRY_RUN_CASES, "cpu", 0.0, 1, 1

    machine = machine_description(device) + (", dry run: Triton's interpreter" if args.dry_run else "")
    peak = peak_gbps(device) or read_bandwidth(16 if args.dry_run else 128 if args.quick else 512)
    cuda = args.device == "cuda"  # the GPU code path (its tensors are on the CPU in a dry run)
    on_gpu = device == "cuda"

    def timed(fn) -> float:
        return time_gpu(fn) if on_gpu else time_call(fn, min_time, min_reps, max_reps)

    fixed: dict[tuple, float] = {}  # the fixed cost of each (batch, dtype, mode)
    rows = []
    for case in cases:
        seconds = {}
        for backend in (naive, fast):
            seconds[backend] = timed(step_fn(case, backend, device))
        key = (case.batch, case.dtype, case.mode)
        if key not in fixed:
            small = Case(case.batch, FIXED_COST_VOCAB, case.dtype, case.mode)
            fn = step_fn(small, fast, device)
            # The least of 5 medians of 200 calls: a call of microseconds fits in the gaps of
            # other work on the machine, which only ever adds time (timeit's advice).
            fixed[key] = timed(fn) if cuda else min(time_call(fn, 0.0, 200, 200) for _ in range(5))
        floor = min(timed(fn) for fn in floor_fns(case, device))
        kernel = timed(kernel_fn(case, device)) if cuda else None
        # On a GPU the share of the card's peak is the kernels' alone (the op's time adds the
        # host's input checks and the status read); on the CPU the op's.
        fast_gbps = case.input_bytes / (kernel if kernel is not None else seconds[fast]) / 1e9
        rows.append(
            dict(
                case=case.name,
                batch=case.batch,
                vocab=case.vocab,
                dtype=case.dtype,
                mode=case.mode,
                fast_backend=fast,
                torch_ms=seconds[naive] * 1e3,
                fast_ms=seconds[fast] * 1e3,
                ratio=seconds[naive] / seconds[fast],
                fixed_us=fixed[key] * 1e6,
                floor_ms=floor * 1e3,
                floor_ratio=seconds[fast] / floor,
                kernel_ms=None if kernel is None else kernel * 1e3,
                fast_gbps=fast_gbps,
                fast_peak_share=fast_gbps / peak if on_gpu else None,
                torch_gbps=case.input_bytes / seconds[naive] / 1e9,
            )
        )
        print(
            f"  {case.name}: torch {rows[-1]['torch_ms']:.3f} ms, {fast} {rows[-1]['fast_ms']:.3f} ms "
            f"({rows[-1]['floor_ratio']:.2f}x the read floor), fixed {rows[-1]['fixed_us']:.1f} µs",
            file=sys.stderr,
            flush=True,
        )
        if case.mode == "sample":  # the last case on these inputs: keep memory bounded
            make_inputs.cache_clear()

    print(f"Machine: {machine}")
    if args.dry_run:
        print("Dry run: the GPU code path on CPU tensors in Triton's interpreter. These times mean nothing.")
    reference = "the card's peak" if on_gpu else "torch summing a large buffer reads"
    print(
        f"Median time per step; ratio = torch / {fast} from the same run. Fixed cost: the {fast} op at "
        f"V = {FIXED_COST_VOCAB}. Read floor: a max-reduction over both input rows, same run. GB/s = bytes "
        f"of both input rows / time ({reference} {peak:.1f} GB/s"
        f"{'; on a GPU the kernel time, no input checks or status read' if args.device == 'cuda' else ''}).\n"
    )
    print(format_table(rows, fast))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine,
                    "device": args.device,
                    "dry_run": args.dry_run,
                    "peak_gbps": peak,
                    "quick": args.quick,
                    "results": rows,
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
