"""End-to-end SafeCoDe decoding benchmark (docs/design.md §6).

On one randomly initialised LLaVA-1.5 (hidden 512, 4 layers, vocabulary 32000, 576 image
tokens, fp32 on the CPU), the same requests and the same noised images, it times the naive
loop, the sequential two-cache loop, the fused decoder, plain generation (the model's own
``generate``), the decoder without steering, and one prefill of the noised branch's
non-shared part (with plain generation: the fused decoder's lower bound), for the steered
phase (5 tokens) and a whole answer (64 tokens), at batch 1 and 8, with a ~300-token shared
system prompt and without one. The measuring lives in ``safecode_kernels.app.benchmarking.decode``
so that the installed package can run it too. Nothing here asserts a time.

Two ways to run it:

    python benchmarks/bench_decode.py [--quick] [--threads N] [--out DIR]   # script mode: writes
        decode_bench.json / .md / .png naming the machine (same as
        python -m safecode_kernels.app.benchmarking.decode)
    python -m pytest benchmarks/bench_decode.py     # pytest-benchmark, one group per case,
                                                    # and the ratio table at the end

pytest mode reads ``SAFECODE_BENCH_THREADS`` (default 1), ``SAFECODE_BENCH_BATCHES``
(default ``1,8``), ``SAFECODE_BENCH_REPS`` (rounds of the fast decoders, default 3; the naive
loop runs once), ``SAFECODE_BENCH_TINY=1`` (the tiny smoke model: seconds) and
``SAFECODE_BENCH_OUT`` (a folder: also write the JSON / markdown / PNG report there). The naive
loop is slow (two full forwards over ~600-900 tokens per steered step, one per ordinary
step): the full pytest run takes about as long as the script mode's, 15-20 minutes here.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import torch

from safecode_kernels.app.benchmarking import decode as bench
from safecode_kernels.app.benchmarking.models import TINY

try:
    import pytest
except ImportError:  # pragma: no cover - script mode needs no pytest
    pytest = None


def _settings() -> bench.Settings:
    settings = bench.Settings(
        threads=int(os.environ.get("SAFECODE_BENCH_THREADS", "1")), reps=int(os.environ.get("SAFECODE_BENCH_REPS", "3"))
    )
    batches = os.environ.get("SAFECODE_BENCH_BATCHES")
    if batches:
        settings.batches = tuple(int(b) for b in batches.split(","))
    if os.environ.get("SAFECODE_BENCH_TINY") == "1":
        settings.spec = TINY
    return settings


SETTINGS = _settings()
CASES = [
    bench.Case(phase, batch, system)
    for batch in SETTINGS.batches
    for system in SETTINGS.systems
    for phase in SETTINGS.phases
]
TIMED = bench.TIMED  # the decoders and the noised-branch prefill

if pytest is not None:

    class _Session:
        """The model, the workloads and every measurement of this pytest session."""

        def __init__(self):
            self.threads = torch.get_num_threads()
            torch.set_num_threads(SETTINGS.threads)
            self.model, self.processor, self.system_text = bench.load(SETTINGS)
            bench.warm_up(self.model, self.processor, SETTINGS, log=lambda line: None)
            self.workloads: dict[tuple[int, bool], bench.Workload] = {}
            self.lengths: dict[str, tuple] = {}
            # case id -> decoder -> (wall seconds per round, CPU seconds per round, greedy ids)
            self.measured: dict[str, dict[str, tuple[list[float], list[float], object]]] = {}

        def workload(self, case: bench.Case) -> bench.Workload:
            key = (case.batch, case.system)
            if key not in self.workloads:
                work = bench.Workload(
                    self.model, self.processor, case.batch, self.system_text if case.system else None, SETTINGS
                )
                self.workloads[key] = work
                self.lengths[f"B={case.batch} {'sys' if case.system else 'nosys'}"] = work.prompt_lengths()
            return self.workloads[key]

        def report(self) -> dict | None:
            results = []
            for case in CASES:
                got = self.measured.get(case.id, {})
                if not all(name in got for name in TIMED):
                    continue  # some decoders deselected: no ratios for this case
                results.append(
                    bench.case_result(
                        case,
                        SETTINGS.tokens(case.phase),
                        {name: got[name][0] for name in TIMED},
                        {name: got[name][1] for name in TIMED},
                        {name: got[name][2] for name in bench.DECODERS},
                    )
                )
            return bench.make_report(SETTINGS, results, self.lengths) if results else None

    @pytest.fixture(scope="module")
    def session(request):
        state = _Session()
        yield state
        torch.set_num_threads(state.threads)
        report = state.report()
        if report is None:
            return
        lines = [""] + bench.markdown(report).splitlines()
        out = os.environ.get("SAFECODE_BENCH_OUT")
        if out:
            lines.append("wrote " + ", ".join(bench.write_report(report, out).values()))
        # Module teardown runs under output capture: print past it, as ``-s`` would.
        plugins = request.config.pluginmanager
        reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
        if reporter is not None:
            with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
                for line in lines:
                    reporter.write_line(line)

    @pytest.mark.parametrize("decoder", TIMED)
    @pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
    def test_decode(benchmark, session, case, decoder):
        torch.set_num_threads(SETTINGS.threads)
        work = session.workload(case)
        n = SETTINGS.tokens(case.phase)
        walls, cpus, outputs = [], [], []

        def timed(fn):
            def target():
                start, cpu = time.perf_counter(), time.process_time()
                out = fn()
                walls.append(time.perf_counter() - start)
                cpus.append(time.process_time() - cpu)
                outputs.append(out)

            return target

        rounds = SETTINGS.naive_reps if decoder == "naive" else SETTINGS.reps
        benchmark.group = case.name
        benchmark.extra_info.update(batch=case.batch, system_prompt=case.system, new_tokens=n)
        if decoder == "noised_prefill":
            # The encoding and the prefix cache are set up before each round, untimed.
            holder = {}

            def setup():
                holder["call"] = work.noised_prefill_call()

            benchmark.pedantic(timed(lambda: holder["call"]()), setup=setup, rounds=rounds, iterations=1)
        else:
            benchmark.pedantic(timed(lambda: work.run(decoder, n)), rounds=rounds, iterations=1)
        session.measured.setdefault(case.id, {})[decoder] = (walls, cpus, outputs[-1])


if __name__ == "__main__":
    sys.exit(bench.main())
