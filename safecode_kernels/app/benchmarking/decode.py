"""End-to-end decoding benchmark (docs/design.md §6).

On one model, the same requests and the same noised images (drawn from the same seed by
every decoder), it times

- ``naive``: :func:`naive_safecode_generate`, two full forwards per steered step, no cache;
- ``two_cache``: :func:`two_cache_safecode_generate`, one KV cache per branch, one branch
  after the other, one request after the other;
- ``fused``: :class:`SafeCoDeDecoder`, both branches of all requests as one batch of 2B rows,
  the text before the image prefilled once;
- ``plain``: the model's own ``generate`` without steering (greedy, image placeholders
  suppressed as the decoders do), on the same prompts and images;
- ``unsteered``: :class:`SafeCoDeDecoder` with ``steer_steps=0`` (plain generation through
  the decoder's own loop: its KV cache and prefill chunking, no second branch), a reference
  that separates the decoder's engineering from the cost of steering;
- ``noised_prefill``: one forward over the noised branch's non-shared part (every position
  from the first image token on, its prefix already cached): the cost no exact implementation
  avoids. ``plain + noised_prefill`` is the *lower bound* of the fused decoder;
  ``unsteered + noised_prefill`` the same bound with the decoder's own loop.

for the steered phase alone (``steer_steps`` tokens) and a whole answer (``steer_steps``
steered + the rest ordinary, 64 tokens by default), at each batch size, with a long shared
system prompt (about 300 tokens before the image) and without one (only ``<s>USER:``).
Every timed call goes from PIL images and strings to token ids: prompt building, noising,
the processor, the forwards and the steps.

Times are the best of the repetitions (the machine may be shared; the fastest run is the one
least disturbed by other work); every repetition is kept in the JSON, with the process CPU
time of each run next to its wall time (with one intra-op thread, CPU time leaves out the
waits for a core that other work on a shared machine causes; the ratios are reported on both). Repetitions of
the decoders of one case are interleaved (round-robin), so a burst of load hits them alike.
Nothing here asserts a time.

Script mode::

    python -m safecode_kernels.app.benchmarking.decode [--quick] [--threads N] [--out DIR]
    python benchmarks/bench_decode.py [...]            # the same

writes ``decode_bench.json``, ``decode_bench.md`` and ``decode_bench.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable

import torch

from ...decoding import SafeCoDeDecoder, naive_safecode_generate, two_cache_safecode_generate
from ...decoding.decoder import _layout
from ...decoding.kv_cache import new_cache
from ...decoding.requests import build_prompt, prepare
from ...refusal import RefusalVocabulary
from .models import BENCH, LlavaSpec, bench_requests, build_llava, system_prompt

DECODERS = ("naive", "two_cache", "fused", "plain", "unsteered")
#: Steered decoders: their greedy ids must agree exactly.
STEERED = ("naive", "two_cache", "fused")
PHASES = ("steered", "answer")


@dataclasses.dataclass(frozen=True)
class Case:
    phase: str  # "steered" (steer_steps tokens) or "answer" (answer_tokens tokens)
    batch: int
    system: bool  # with the long shared system prompt

    @property
    def name(self) -> str:
        return f"{self.phase} B={self.batch} {'system prompt' if self.system else 'no system prompt'}"

    @property
    def id(self) -> str:
        return f"{self.phase}-B{self.batch}-{'sys' if self.system else 'nosys'}"


@dataclasses.dataclass
class Settings:
    spec: LlavaSpec = BENCH
    batches: tuple[int, ...] = (1, 8)
    systems: tuple[bool, ...] = (False, True)
    phases: tuple[str, ...] = PHASES
    steer_steps: int = 5
    answer_tokens: int = 64
    system_tokens: int = 300
    reps: int = 3  # fused, two_cache, plain, noised_prefill
    naive_reps: int = 1
    threads: int = 1
    backend: str = "auto"  # of the step op
    seed: int = 0
    quick: bool = False

    def tokens(self, phase: str) -> int:
        return self.steer_steps if phase == "steered" else self.answer_tokens


class Workload:
    """The model, the processor and the requests of one (batch, system prompt) group, with a
    callable per decoder that runs it end to end for ``max_new_tokens`` tokens."""

    def __init__(self, model, processor, batch: int, system: str | None, settings: Settings):
        self.model, self.processor, self.settings = model, processor, settings
        self.images, self.prompts, self.verdicts = bench_requests(batch, settings.seed)
        self.system = system
        self.refusal = RefusalVocabulary.from_tokenizer(processor)
        self.image_token_id = int(model.config.image_token_id)
        self.common = dict(
            steer_steps=settings.steer_steps, seed=settings.seed, refusal=self.refusal, backend=settings.backend
        )
        self.fused_decoder = SafeCoDeDecoder(model, processor, **self.common)
        self.unsteered_decoder = SafeCoDeDecoder(model, processor, **{**self.common, "steer_steps": 0})

    def _kwargs(self, n: int) -> dict:
        # No EOS: every decoder generates exactly n tokens.
        return dict(max_new_tokens=n, system_prompt=self.system, eos_token_id=[])

    def run(self, decoder: str, n: int) -> list[list[int]]:
        if decoder == "fused":
            return self.fused_decoder.generate(self.images, self.prompts, self.verdicts, **self._kwargs(n)).sequences
        if decoder == "naive":
            return naive_safecode_generate(
                self.model, self.processor, self.images, self.prompts, self.verdicts, **self.common, **self._kwargs(n)
            ).sequences
        if decoder == "two_cache":
            return two_cache_safecode_generate(
                self.model, self.processor, self.images, self.prompts, self.verdicts, **self.common, **self._kwargs(n)
            ).sequences
        if decoder == "plain":
            return self.plain(n)
        if decoder == "unsteered":
            return self.unsteered_decoder.generate(
                self.images, self.prompts, self.verdicts, **self._kwargs(n)
            ).sequences
        raise ValueError(f"unknown decoder {decoder!r}")

    def plain_inputs(self):
        """Prompts through the processor, left-padded as ``generate`` wants them."""
        from ...decoding.adapters import get_adapter

        adapter = get_adapter(self.model, self.processor)
        texts = [build_prompt(adapter, self.processor, p, self.system) for p in self.prompts]
        return self.processor(images=self.images, text=texts, padding=True, padding_side="left", return_tensors="pt")

    def plain(self, n: int) -> list[list[int]]:
        """Plain greedy generation with the model's own ``generate`` (no steering)."""
        with torch.inference_mode():
            enc = self.plain_inputs()
            out = self.model.generate(
                **enc,
                max_new_tokens=n,
                min_new_tokens=0,
                do_sample=False,
                suppress_tokens=[self.image_token_id],
                eos_token_id=None,
                pad_token_id=self.processor.tokenizer.pad_token_id,
            )
        return out[:, enc["input_ids"].shape[1] :].tolist()

    def noised_prefill_call(self) -> Callable[[], object]:
        """Everything before the noised branch's non-shared prefill (encoding, its prefix in a
        cache), done now; returns the call that runs that prefill for all requests."""
        setup = prepare(
            self.model,
            self.processor,
            self.images,
            self.prompts,
            self.verdicts,
            **self._kwargs(1),
            steer_steps=1,
            seed=self.settings.seed,
            refusal=self.refusal,
            backend=self.settings.backend,
        )
        for request in setup.requests:
            request.real = request.noised  # the layout's single branch is the noised one
        adapter = setup.adapter
        with torch.inference_mode():
            layout = _layout(setup, 1, share_prefix=True)
            positions, _ = adapter.prompt_positions(layout.input_ids, layout.attention_mask, layout.vision)
            cache, p, mask = new_cache(self.model), layout.prefix, layout.attention_mask
            if p:
                adapter.forward(
                    layout.input_ids[:, :p],
                    mask[:, :p],
                    adapter.slice_positions(positions, slice(None), slice(None, p)),
                    cache,
                    logits=False,
                )
        suffix = (layout.input_ids[:, p:], mask, adapter.slice_positions(positions, slice(None), slice(p, None)))

        def run():
            with torch.inference_mode():
                return adapter.forward(*suffix, cache, vision=layout.vision)

        return run

    def noised_prefill(self) -> tuple[float, float]:
        """Seconds (wall, CPU) of one forward over the noised branch's non-shared part, for all
        requests (its shared prefix is prefilled first, untimed)."""
        call = self.noised_prefill_call()
        seconds, cpu, _ = _timed(call)
        return seconds, cpu

    def prompt_lengths(self) -> tuple[list[int], list[int]]:
        """Prompt tokens and tokens before the image, per request."""
        setup = prepare(
            self.model,
            self.processor,
            self.images,
            self.prompts,
            self.verdicts,
            **self._kwargs(1),
            steer_steps=0,
            refusal=self.refusal,
            backend=self.settings.backend,
        )
        return [int(r.input_ids.numel()) for r in setup.requests], [r.prefix_len for r in setup.requests]


def _timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - start, time.process_time() - cpu, out


TIMED = (*DECODERS, "noised_prefill")


def measure_case(work: Workload, case: Case, settings: Settings, log=print) -> dict:
    """Time every decoder on ``case`` (round-robin repetitions); returns the result record."""
    n = settings.tokens(case.phase)
    wall: dict[str, list[float]] = {name: [] for name in TIMED}
    cpu: dict[str, list[float]] = {name: [] for name in TIMED}
    outputs: dict[str, list[list[int]]] = {}
    reps = {name: settings.reps for name in TIMED}
    reps["naive"] = settings.naive_reps
    for round_ in range(max(reps.values())):
        order = list(TIMED)
        order = order[round_ % len(order) :] + order[: round_ % len(order)]  # rotate who goes first
        for name in order:
            if len(wall[name]) >= reps[name]:
                continue
            if name == "noised_prefill":
                seconds, cpu_seconds = work.noised_prefill()
            else:
                seconds, cpu_seconds, outputs[name] = _timed(lambda name=name: work.run(name, n))
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
            log(f"  {case.name:38s} {name:15s} {seconds:8.3f} s (CPU {cpu_seconds:.3f} s)")
    return case_result(case, n, wall, cpu, outputs, log)


def case_result(
    case: Case,
    n: int,
    wall: dict[str, list[float]],
    cpu: dict[str, list[float]],
    outputs: dict[str, list[list[int]]],
    log=print,
) -> dict:
    """The result record of one case from every decoder's times (wall and CPU seconds of each
    repetition) and greedy ids."""
    best = _with_bounds({name: min(ts) for name, ts in wall.items()})
    best_cpu = _with_bounds({name: min(ts) for name, ts in cpu.items()})
    agree = all(outputs[name] == outputs["naive"] for name in STEERED)
    plain_agree = outputs["plain"] == outputs["unsteered"]
    if not agree:
        log(f"  WARNING {case.name}: the steered decoders disagree: " + "; ".join(f"{k}={outputs[k]}" for k in STEERED))
    return dict(
        case=case.name,
        id=case.id,
        phase=case.phase,
        batch=case.batch,
        system_prompt=case.system,
        new_tokens=n,
        seconds=best,
        cpu_seconds=best_cpu,
        all_seconds=wall,
        all_cpu_seconds=cpu,
        steered_ids_agree=agree,
        plain_ids_agree=plain_agree,
        ratios=ratios(best),
        cpu_ratios=ratios(best_cpu),
    )


def _with_bounds(best: dict[str, float]) -> dict[str, float]:
    best["lower_bound"] = best["plain"] + best["noised_prefill"]
    best["lower_bound_unsteered"] = best["unsteered"] + best["noised_prefill"]
    return best


def ratios(best: dict[str, float]) -> dict[str, float]:
    """Speed-ups over the naive loop, slow-downs against plain generation, and the fused decoder
    against the two-cache loop and the lower bounds."""
    out = {}
    for name in (*DECODERS, "lower_bound", "lower_bound_unsteered"):
        out[f"{name}_speedup_vs_naive"] = best["naive"] / best[name]
        out[f"{name}_vs_plain"] = best[name] / best["plain"]
    out["fused_speedup_vs_two_cache"] = best["two_cache"] / best["fused"]
    out["fused_vs_lower_bound"] = best["fused"] / best["lower_bound"]
    out["fused_vs_lower_bound_unsteered"] = best["fused"] / best["lower_bound_unsteered"]
    return out


# ------------------------------------------------------------------------------------------
# Reporting


def machine_description(threads: int | None = None) -> str:
    """CPU model, logical CPUs, torch version and threads, OS, load average."""
    processor = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        processor = model or processor
    except OSError:
        pass
    if torch.cuda.is_available():
        processor += f" + {torch.cuda.get_device_name()}"
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg())
    threads = torch.get_num_threads() if threads is None else threads
    return (
        f"{processor or platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"(intra-op threads: {threads}), Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}{load}"
    )


_LABELS = {
    "naive": "naive loop",
    "two_cache": "two-cache loop",
    "fused": "fused decoder (SafeCoDeDecoder)",
    "plain": "plain generation (HF generate)",
    "unsteered": "unsteered decoder (steer_steps=0)",
    "noised_prefill": "noised-branch prefill alone",
    "lower_bound": "lower bound: plain + noised prefill",
    "lower_bound_unsteered": "lower bound, own loop: unsteered + noised prefill",
}
_ROWS = (*DECODERS, "noised_prefill", "lower_bound", "lower_bound_unsteered")


def _system_label(report: dict, system: bool) -> str:
    return f"~{report['system_tokens']} tokens" if system else "none"


def markdown(report: dict) -> str:
    settings = report["settings"]
    lines = [
        "# SafeCoDe end-to-end decoding benchmark",
        "",
        f"Machine: {report['machine']}",
        "",
        f"Model: {report['model']}",
        "",
        f"Requests: {report['requests']}",
        "",
        f"Settings: steer_steps={settings['steer_steps']}, whole answer {settings['answer_tokens']} tokens, "
        f"torch threads {settings['threads']} for every decoder, step-op backend {settings['backend']!r}, "
        f"{settings['reps']} repetition(s) per decoder ({settings['naive_reps']} for the naive loop), "
        f"best of the repetitions.",
        "",
        "Every run goes from PIL images and strings to token ids. `vs naive` = naive time / time "
        "(speed-up); `vs plain` = time / plain-generation time (the cost of steering). Wall-clock "
        "seconds; the CPU-time columns (process time, one thread) leave out waits for a core on a "
        "shared machine. Ratios from this run only. `fused / lower bound` compares the fused decoder with "
        "plain generation plus one prefill of the noised branch, the least any exact implementation pays: "
        "near 1, the decoder adds little else.",
        "",
    ]
    lines += [
        "## Summary",
        "",
        "| phase | batch | system prompt | fused vs naive | fused vs two-cache | fused / plain | "
        "fused / lower bound | fused / lower bound (own loop) | same as naive |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        q, c = r["ratios"], r["cpu_ratios"]
        lines.append(
            f"| {r['phase']} | {r['batch']} | {_system_label(report, r['system_prompt'])} "
            f"| {q['fused_speedup_vs_naive']:.2f}x (CPU {c['fused_speedup_vs_naive']:.2f}x) "
            f"| {q['fused_speedup_vs_two_cache']:.2f}x (CPU {c['fused_speedup_vs_two_cache']:.2f}x) "
            f"| {q['fused_vs_plain']:.2f} (CPU {c['fused_vs_plain']:.2f}) "
            f"| {q['fused_vs_lower_bound']:.2f} (CPU {c['fused_vs_lower_bound']:.2f}) "
            f"| {q['fused_vs_lower_bound_unsteered']:.2f} (CPU {c['fused_vs_lower_bound_unsteered']:.2f}) "
            f"| {'yes' if r['steered_ids_agree'] else '**NO**'} |"
        )
    lines.append("")
    for phase in PHASES:
        rows = [r for r in report["results"] if r["phase"] == phase]
        if not rows:
            continue
        what = (
            f"Steered phase: prompt to {settings['steer_steps']} steered tokens"
            if phase == "steered"
            else f"Whole answer: {settings['steer_steps']} steered + "
            f"{settings['answer_tokens'] - settings['steer_steps']} ordinary tokens"
        )
        lines += [
            f"## {what}",
            "",
            "| batch | system prompt | decoder | time s | s / request | vs naive | vs plain | CPU s | "
            "CPU vs naive | CPU vs plain |",
            "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            t_all, c_all = r["seconds"], r["cpu_seconds"]
            for name in _ROWS:
                t, c = t_all[name], c_all[name]
                label = f"**{_LABELS[name]}**" if name == "fused" else _LABELS[name]
                cells = ["", "", "", ""]
                if name != "noised_prefill":
                    cells = [
                        f"{t_all['naive'] / t:.2f}x",
                        f"{t / t_all['plain']:.2f}",
                        f"{c_all['naive'] / c:.2f}x",
                        f"{c / c_all['plain']:.2f}",
                    ]
                lines.append(
                    f"| {r['batch']} | {_system_label(report, r['system_prompt'])} | {label} | {t:.3f} "
                    f"| {t / r['batch']:.3f} | {cells[0]} | {cells[1]} | {c:.3f} | {cells[2]} | {cells[3]} |"
                )
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = ("naive", "two_cache", "fused", "plain", "lower_bound")
    colors = {
        "naive": "#c44e52",
        "two_cache": "#dd8452",
        "fused": "#4c72b0",
        "plain": "#55a868",
        "lower_bound": "#8c8c8c",
    }
    phases = [p for p in PHASES if any(r["phase"] == p for r in report["results"])]
    fig, axes = plt.subplots(1, len(phases), figsize=(7 * len(phases), 5.8), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        rows = [r for r in report["results"] if r["phase"] == phase]
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(rows))]
            ys = [r["seconds"][name] / r["batch"] for r in rows]
            ax.bar(xs, ys, width, label=_LABELS[name], color=colors[name])
            if name == "fused":
                for x, y, r in zip(xs, ys, rows):
                    ax.annotate(
                        f"{r['ratios']['fused_speedup_vs_naive']:.1f}x", (x, y), ha="center", va="bottom", fontsize=8
                    )
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(
            [f"B={r['batch']}\n{'system prompt' if r['system_prompt'] else 'no system prompt'}" for r in rows]
        )
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_ylabel("seconds per request, wall clock (log scale)")
        settings = report["settings"]
        ax.set_title(
            f"steered phase ({settings['steer_steps']} tokens)"
            if phase == "steered"
            else f"whole answer ({settings['answer_tokens']} tokens)"
        )
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    fig.suptitle(
        f"SafeCoDe decoding: {report['model_short']} (labels: fused speed-up over the naive loop)\n{report['machine']}",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out_dir: str, stem: str = "decode_bench") -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{stem}.{ext}") for ext in ("json", "md", "png")}
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=2)
    with open(paths["md"], "w") as f:
        f.write(markdown(report))
    try:
        plot(report, paths["png"])
    except ImportError as err:  # matplotlib is optional
        print(f"no plot: {err}", file=sys.stderr)
        del paths["png"]
    return paths


# ------------------------------------------------------------------------------------------
# Running


def run(settings: Settings, log=print) -> dict:
    """Build the model, warm every decoder up, measure every case; the report as a dict.
    Uses ``settings.threads`` torch threads throughout and restores the previous count."""
    threads = torch.get_num_threads()
    try:
        return _run(settings, log)
    finally:
        torch.set_num_threads(threads)


def load(settings: Settings):
    """``(model, processor, system prompt text)`` of the benchmark."""
    model, processor = build_llava(settings.spec, settings.seed)
    return model, processor, system_prompt(processor.tokenizer, settings.system_tokens)


def warm_up(model, processor, settings: Settings, log=print) -> None:
    """One short run of every decoder on one request: first calls pay for lazy imports,
    allocator growth and thread pools."""
    warm = Workload(model, processor, 1, None, settings)
    for name in DECODERS:
        seconds, _, _ = _timed(lambda name=name: warm.run(name, 2))
        log(f"  warm-up {name}: {seconds:.2f} s")
    warm.noised_prefill()


def _run(settings: Settings, log) -> dict:
    torch.set_num_threads(settings.threads)
    model, processor, sys_text = load(settings)
    log(f"machine: {machine_description()}")
    log(f"model: {settings.spec.describe()}")
    warm_up(model, processor, settings, log)

    results, lengths = [], {}
    for batch in settings.batches:
        for system in settings.systems:
            work = Workload(model, processor, batch, sys_text if system else None, settings)
            lengths[f"B={batch} {'sys' if system else 'nosys'}"] = work.prompt_lengths()
            for phase in settings.phases:
                results.append(measure_case(work, Case(phase, batch, system), settings, log))
                r = results[-1]["ratios"]
                c = results[-1]["cpu_ratios"]
                log(
                    f"  -> fused vs naive {r['fused_speedup_vs_naive']:.2f}x (CPU {c['fused_speedup_vs_naive']:.2f}x), "
                    f"vs two-cache {r['fused_speedup_vs_two_cache']:.2f}x "
                    f"(CPU {c['fused_speedup_vs_two_cache']:.2f}x), "
                    f"/ lower bound {r['fused_vs_lower_bound']:.2f} (CPU {c['fused_vs_lower_bound']:.2f}), "
                    f"/ plain {r['fused_vs_plain']:.2f}"
                )
    return make_report(settings, results, lengths)


def make_report(settings: Settings, results: list[dict], lengths: dict) -> dict:
    """The report: machine, model, settings and per-case results."""
    settings_dict = dataclasses.asdict(settings)
    settings_dict["spec"] = dataclasses.asdict(settings.spec)
    return dict(
        machine=machine_description(settings.threads),
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        model=settings.spec.describe(),
        model_short=f"LLaVA-1.5 hidden {settings.spec.hidden_size}, {settings.spec.num_layers} layers, "
        f"V={settings.spec.vocab_size}, {settings.spec.image_tokens} image tokens, fp32",
        requests=(
            "per batch: different user prompts and image sizes, verdicts cycling unsafe/safe/none; "
            "greedy; no EOS (exactly the requested number of tokens); prompt lengths (tokens, tokens "
            "before the image): " + "; ".join(f"{k}: {v[0]}, {v[1]}" for k, v in lengths.items())
        ),
        system_tokens=settings.system_tokens,
        settings=settings_dict,
        results=results,
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The benchmark's options; ``prog`` names the command in its usage line."""
    from ..cli import Parser

    parser = Parser(
        prog=prog,
        description="SafeCoDe end-to-end decoding benchmark: the naive loop, the two-cache loop, the fused "
        "decoder, plain generation and the lower bound, on a randomly initialised LLaVA-1.5 (fp32, CPU "
        "unless CUDA is there). Writes decode_bench.json, .md and .png to --out; times are measured, "
        "never asserted.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="batch 1 only, one repetition each (minutes on a CPU instead of tens of minutes; default: off)",
    )
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default: 1 8)")
    parser.add_argument(
        "--phases",
        nargs="+",
        choices=PHASES,
        default=None,
        help="steered: the prompt to the last steered token; answer: a whole answer (default: both)",
    )
    parser.add_argument(
        "--no-system", action="store_true", help="only without the system prompt (default: with and without)"
    )
    parser.add_argument(
        "--system-only", action="store_true", help="only with the system prompt (default: with and without)"
    )
    parser.add_argument("--reps", type=int, default=None, help="repetitions of the fast decoders (default 3)")
    parser.add_argument("--naive-reps", type=int, default=None, help="repetitions of the naive loop (default 1)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for every decoder (default 1: stable on a shared machine)",
    )
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "cpu", "triton"],
        help="backend of the step op (default auto)",
    )
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny smoke-test model instead (seconds; default: the benchmark model)"
    )
    parser.add_argument(
        "--out", default="bench-results", help="folder for the JSON, markdown and PNG (default bench-results)"
    )
    return parser


def parse_args(argv=None, prog: str | None = None) -> tuple[Settings, str]:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    # Counts are checked before any model is built (exit 2, as argparse's own errors).
    for option in ("batches", "reps", "naive_reps", "threads"):
        values = getattr(args, option)
        values = values if isinstance(values, list) else [values]
        if any(v is not None and v < 1 for v in values):
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    from .models import TINY

    settings = Settings(threads=args.threads, backend=args.backend, quick=args.quick)
    if args.tiny:
        settings.spec = TINY
    if args.quick:
        settings.batches, settings.reps = (1,), 1
    if args.batches:
        settings.batches = tuple(args.batches)
    if args.phases:
        settings.phases = tuple(args.phases)
    if args.no_system:
        settings.systems = (False,)
    if args.system_only:
        settings.systems = (True,)
    if args.reps is not None:
        settings.reps = args.reps
    if args.naive_reps is not None:
        settings.naive_reps = args.naive_reps
    return settings, args.out


def main(argv=None, prog: str | None = None) -> int:
    """Script mode: parse ``argv``, run, write the report files, print the markdown; 0.
    ``prog``: the command in the usage line (the CLI passes ``safecode-kernels bench``)."""
    settings, out = parse_args(argv, prog)
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    report = run(settings, log)
    paths = write_report(report, out)
    print(markdown(report))
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
