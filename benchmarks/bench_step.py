"""Microbenchmark of the fused step op: the ``cpu`` kernel against the naive ``torch`` backend.

Cases: B in {1, 16, 64} x V in {32000, 152064} x fp32 / bf16 x greedy / sampling
(temperature 0.7, top-k 50, top-p 0.9), default steering (alpha 0.3, k = 20, scope
"sensitive"), mixed verdicts, 64 refusal tokens. Every case reports the time of both
backends measured in the same run, their ratio (torch / cpu) and the cpu kernel's effective
bandwidth: the bytes of both input rows (2 * B * V * itemsize) per second. Nothing here
asserts a time.

Two ways to run it:

    python -m pytest benchmarks/bench_step.py            # pytest-benchmark, one group per case,
                                                         # and a ratio table at the end
    python benchmarks/bench_step.py [--quick] [--threads N] [--json out.json]   # a markdown table

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
from safecode_kernels.dispatch import backend_status

BACKENDS = ("torch", "cpu")
BATCHES = (1, 16, 64)
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


@functools.lru_cache(maxsize=2)
def make_inputs(batch: int, vocab: int, dtype: str):
    """Logit rows like a model's: the noised branch correlated with the real one."""
    g = torch.Generator().manual_seed(batch * 1_000_003 + vocab)
    real = torch.randn(batch, vocab, generator=g) * 3.0
    noised = 0.8 * real + 0.6 * torch.randn(batch, vocab, generator=g) * 3.0
    verdict = torch.tensor([(1, -1, 0)[i % 3] for i in range(batch)], dtype=torch.int8)
    refusal = torch.randperm(vocab, generator=g)[:NUM_REFUSAL].sort().values
    return real.to(DTYPES[dtype]).contiguous(), noised.to(DTYPES[dtype]).contiguous(), verdict, refusal


def step_fn(case: Case, backend: str):
    """A zero-argument callable doing one step of ``case`` on ``backend``."""
    real, noised, verdict, refusal = make_inputs(case.batch, case.vocab, case.dtype)
    params = MODES[case.mode]
    return functools.partial(sk.safecode_step, real, noised, verdict, refusal, params,
                             generator=1234, backend=backend)


def machine_description() -> str:
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
    return (f"{processor or platform.machine()}, {os.cpu_count()} logical CPUs, "
            f"torch {torch.__version__} (threads: {torch.get_num_threads()}), Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}{load}")


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
    _CPU_REASON = backend_status()["cpu"]

    # Both backends of a case side by side, so that they run on the same (cached) inputs.
    @pytest.mark.parametrize("case,backend", [(c, b) for c in CASES for b in BACKENDS],
                             ids=[f"{c.id}-{b}" for c in CASES for b in BACKENDS])
    def test_step(benchmark, bench_results, case, backend):
        threads = os.environ.get("SAFECODE_BENCH_THREADS")
        if threads:
            torch.set_num_threads(int(threads))
        if backend == "cpu" and _CPU_REASON is not None:
            pytest.skip(f"cpu backend unavailable: {_CPU_REASON}")
        fn = step_fn(case, backend)
        fn()  # warm up (first-call allocations, thread pool start)
        benchmark.group = case.name
        benchmark.extra_info["input_bytes"] = case.input_bytes
        benchmark(fn)
        if benchmark.stats is not None:  # None under --benchmark-disable
            bench_results.setdefault(case, {})[backend] = benchmark.stats.stats.mean


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


def format_table(rows: list[dict]) -> str:
    lines = ["| case | torch ms | cpu ms | ratio torch/cpu | cpu GB/s | torch GB/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['torch_ms']:.3f} | {r['cpu_ms']:.3f} | {r['ratio']:.1f}x | "
                     f"{r['cpu_gbps']:.1f} | {r['torch_gbps']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="B in {1, 16} only, and shorter timing loops")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch / OpenMP threads for both backends (default: torch's default)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    reason = backend_status()["cpu"]
    if reason is not None:
        print(f"the cpu backend is unavailable: {reason}", file=sys.stderr)
        return 1
    cases = QUICK_CASES if args.quick else CASES
    min_time, min_reps, max_reps = (0.3, 3, 200) if args.quick else (1.0, 5, 1000)

    machine = machine_description()
    peak = read_bandwidth(128 if args.quick else 512)
    rows = []
    for case in cases:
        seconds = {b: time_call(step_fn(case, b), min_time, min_reps, max_reps) for b in BACKENDS}
        rows.append(dict(
            case=case.name, batch=case.batch, vocab=case.vocab, dtype=case.dtype, mode=case.mode,
            torch_ms=seconds["torch"] * 1e3, cpu_ms=seconds["cpu"] * 1e3,
            ratio=seconds["torch"] / seconds["cpu"],
            cpu_gbps=case.input_bytes / seconds["cpu"] / 1e9,
            torch_gbps=case.input_bytes / seconds["torch"] / 1e9,
        ))
        print(f"  {case.name}: torch {rows[-1]['torch_ms']:.3f} ms, cpu {rows[-1]['cpu_ms']:.3f} ms",
              file=sys.stderr, flush=True)
        if case.mode == "sample":  # the last case on these inputs: keep memory bounded
            make_inputs.cache_clear()

    print(f"Machine: {machine}")
    print(f"Median time per step; ratio = torch / cpu from the same run. GB/s = bytes of both input "
          f"rows / time (torch summing a large buffer reads {peak:.1f} GB/s here).\n")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "read_bandwidth_gbps": peak, "quick": args.quick, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
