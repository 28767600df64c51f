"""Evaluation-harness throughput: requests per second of ``run_eval`` against a one-request loop.

On the benchmark LLaVA (``safecode_kernels.app.benchmarking.models.BENCH``: random fp32 weights,
576 image tokens; ``--quick``: the ``TINY`` smoke model), the same JSONL benchmark of N
image-prompt samples (images of different sizes written as PNG files, verdicts cycling unsafe /
safe / none through a judge that knows them) goes through

- ``naive loop``: the authors' driver's shape: for each request in turn, open its image, draw its
  noised image, :func:`naive_safecode_generate` (two full forwards per steered step, no KV cache),
  append its answer to a JSON Lines file;
- ``run_eval``: :func:`safecode_kernels.evaluation.run.run_eval`, batches of ``--batch-size``
  through :class:`SafeCoDeDecoder`, every batch fsynced to ``generations.jsonl``.

Both draw each sample's noised image from the same per-sample seed and decode greedily, so their
answers must agree (the table says whether they did). Both are measured in this run, wall clock,
best of ``--reps`` (a fresh output folder each time); nothing asserts a time.

    python benchmarks/bench_eval.py [--quick] [--requests N] [--batch-size B] [--max-new-tokens T]
                                    [--threads N] [--reps R] [--out benchmarks/results]

prints the table, and with ``--out`` writes ``eval_bench_cpu.json`` and ``.md`` there.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from safecode_kernels import make_noised_image, naive_safecode_generate
from safecode_kernels.app.benchmarking.decode import machine_description
from safecode_kernels.app.benchmarking.models import BENCH, TINY, bench_image, bench_requests, build_llava
from safecode_kernels.evaluation.loaders import load_benchmark
from safecode_kernels.evaluation.run import run_eval, sample_seed
from safecode_kernels.judges import Judgement
from safecode_kernels.verdict import Verdict

SIZES = ((480, 360), (640, 480), (360, 360), (500, 375))
NOISE_STD = 0.1


class KnownVerdicts:
    """A judge that gives each prompt the verdict the workload assigned it (no judging cost)."""

    def __init__(self, verdicts: dict[str, str]):
        self.verdicts = verdicts

    def judge(self, images, prompts):
        return [Judgement(Verdict.parse(self.verdicts[p]), None, self.verdicts[p], parsed=False) for p in prompts]


def write_workload(folder: Path, n: int) -> tuple[Path, dict[str, str]]:
    """``n`` samples as a JSONL benchmark (``samples.jsonl`` + PNG images); returns it and the
    verdict of each prompt. Prompts are made unique so that the prompt names its verdict."""
    _, prompts, verdicts = bench_requests(n)
    lines, by_prompt = [], {}
    for i in range(n):
        prompt = f"{prompts[i]} (request {i})"
        bench_image(i, SIZES[i % len(SIZES)]).save(folder / f"image{i}.png")
        lines.append(json.dumps({"id": f"r{i}", "image": f"image{i}.png", "prompt": prompt}))
        by_prompt[prompt] = verdicts[i]
    path = folder / "samples.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, by_prompt


def naive_loop(model, processor, samples, verdicts, out: Path, steer_steps: int, max_new_tokens: int) -> list[str]:
    """One request at a time, uncached, appending each answer as it comes (the authors' driver)."""
    from PIL import Image

    texts = []
    with open(out, "a", encoding="utf-8") as f:
        for sample in samples:
            with Image.open(sample.image) as file:
                image = file.convert("RGB")
            generator = torch.Generator().manual_seed(sample_seed(0, sample))
            noised = make_noised_image(image, NOISE_STD, generator=generator)
            result = naive_safecode_generate(
                model,
                processor,
                [image],
                [sample.prompt],
                [verdicts[sample.prompt]],
                steer_steps=steer_steps,
                max_new_tokens=max_new_tokens,
                noised_images=[noised],
                do_sample=False,
            )
            f.write(json.dumps({"id": sample.id, "response": result.texts[0]}) + "\n")
            f.flush()
            texts.append(result.texts[0])
    return texts


def harness(model, processor, samples, verdicts, out: Path, args) -> list[str]:
    run_eval(
        model,
        processor,
        samples,
        out,
        verdict="auto",
        judge=KnownVerdicts(verdicts),
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        steer_steps=args.steer_steps,
        noise_std=NOISE_STD,
        progress=False,
    )
    by_id = {line["id"]: line["response"] for line in map(json.loads, (out / "generations.jsonl").open())}
    return [by_id[s.id] for s in samples]


def measure(args) -> dict:
    spec = TINY if args.quick else BENCH
    torch.set_num_threads(args.threads)
    model, processor = build_llava(spec)
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        tmp = Path(tmp)
        data, verdicts = write_workload(tmp, args.requests)
        samples = load_benchmark("jsonl", data)
        # Warm up both paths on one request (lazy initialisation, allocator growth).
        naive_loop(model, processor, samples[:1], verdicts, tmp / "warm.jsonl", args.steer_steps, 2)
        harness(
            model,
            processor,
            samples[:1],
            verdicts,
            tmp / "warm",
            argparse.Namespace(**{**vars(args), "max_new_tokens": 2}),
        )
        times = {"naive": [], "run_eval": []}
        answers = {}
        for rep in range(args.reps):
            for name in times:  # interleaved, so a burst of load on the machine hits both alike
                start = time.perf_counter()
                if name == "naive":
                    answers[name] = naive_loop(
                        model,
                        processor,
                        samples,
                        verdicts,
                        tmp / f"naive{rep}.jsonl",
                        args.steer_steps,
                        args.max_new_tokens,
                    )
                else:
                    answers[name] = harness(model, processor, samples, verdicts, tmp / f"run{rep}", args)
                times[name].append(time.perf_counter() - start)
    best = {name: min(values) for name, values in times.items()}
    return {
        "benchmark": "eval harness throughput",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_description(args.threads),
        "model": spec.describe(),
        "device": next(model.parameters()).device.type,
        "settings": {
            "requests": args.requests,
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "steer_steps": args.steer_steps,
            "threads": args.threads,
            "reps": args.reps,
            "verdicts": "cycling unsafe / safe / none",
            "quick": args.quick,
        },
        "seconds": times,
        "best_seconds": best,
        "requests_per_second": {name: args.requests / t for name, t in best.items()},
        "speedup": best["naive"] / best["run_eval"],
        "same_answers": answers["naive"] == answers["run_eval"],
    }


def markdown(report: dict) -> str:
    s = report["settings"]
    rows = [
        ("naive loop (one request at a time, no cache)", "naive"),
        ("run_eval (batched SafeCoDeDecoder)", "run_eval"),
    ]
    lines = [
        "# Evaluation harness throughput",
        "",
        f"Machine: {report['machine']}",
        "",
        f"Model: {report['model']}",
        "",
        f"Workload: {s['requests']} JSONL samples (PNG images of 4 sizes), verdicts {s['verdicts']}, greedy, "
        f"{s['max_new_tokens']} new tokens (no EOS), {s['steer_steps']} steered; run_eval batch size "
        f"{s['batch_size']}; torch threads {s['threads']}; best of {s['reps']} (wall clock, this run).",
        "",
        "| driver | seconds | requests/s | vs naive |",
        "|---|---:|---:|---:|",
    ]
    for label, name in rows:
        t = report["best_seconds"][name]
        lines.append(
            f"| {label} | {t:.3f} | {report['requests_per_second'][name]:.3f} | "
            f"{report['best_seconds']['naive'] / t:.2f}x |"
        )
    lines += ["", f"Same answers: {'yes' if report['same_answers'] else 'NO'}."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="requests/s of run_eval against a one-request naive loop")
    parser.add_argument("--quick", action="store_true", help="the tiny smoke model, 4 requests, 8 tokens (seconds)")
    parser.add_argument("--requests", type=int, default=None, help="samples (default 8; --quick 4)")
    parser.add_argument("--batch-size", type=int, default=8, help="run_eval batch size (default 8)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="tokens per answer (default 32; --quick 8)")
    parser.add_argument("--steer-steps", type=int, default=5, help="steered first tokens (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--reps", type=int, default=1, help="repetitions, best kept (default 1)")
    parser.add_argument(
        "--out", default=None, metavar="DIR", help="write eval_bench_cpu.json and .md there (e.g. benchmarks/results)"
    )
    args = parser.parse_args(argv)
    args.requests = args.requests or (4 if args.quick else 8)
    args.max_new_tokens = args.max_new_tokens or (8 if args.quick else 32)
    for flag in ("requests", "batch_size", "max_new_tokens", "threads", "reps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report = measure(args)
    text = markdown(report)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"eval_bench_{report['device']}")
        with open(stem + ".json", "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        with open(stem + ".md", "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {stem}.json, {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
