"""The evaluation subcommands of ``safecode-kernels``: ``eval``, ``score`` and ``report``.

- ``eval``: generate an answer for every sample of a benchmark with one method, into a run
  folder (``generations.jsonl``, ``run.json``); resumable (:mod:`safecode_kernels.evaluation.run`).
- ``score``: judge a run's answers and write its report (:mod:`safecode_kernels.evaluation.scoring`).
- ``report``: several scored runs side by side.

Exit status as the rest of the command line: 0 success (an ``eval`` whose samples partly failed
included: each failure is an ``error`` line, counted in the summary); 1 a failure while running;
2 bad input (arguments, a data folder that does not match its benchmark's layout, a run folder
made with another configuration); 3 the judge failed; 130 after Ctrl-C (what is saved stays, and
the same command resumes).

``eval --ray`` runs the same generation on a pool of Ray workers
(:mod:`safecode_kernels.evaluation.ray_run`), into the same run folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys
from pathlib import Path

from .cli import (
    CLIError,
    _first_line,
    check_architecture,
    check_backend,
    check_decoder_args,
    check_judge_args,
    choice,
    load_model,
    make_judge,
    resolve_device,
    resolve_model,
)

#: Benchmarks whose data may come from the Hugging Face cache without --data.
HUB_BENCHMARKS = ("hades", "msts")


def register(subparsers) -> None:
    """Add ``eval``, ``score`` and ``report`` to the ``safecode-kernels`` subparsers."""
    _add_eval(subparsers)
    _add_score(subparsers)
    _add_report(subparsers)


def _add_judge_server(p, judge: str, timeout: float) -> None:
    """The chat-completions server flags of ``eval`` (``judge``: "--judge openai") and ``score``."""
    p.add_argument(
        "--judge-url",
        default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
        help=f"chat-completions server of {judge} (default $OPENAI_BASE_URL or the OpenAI API)",
    )
    p.add_argument("--judge-model", default="gpt-4o-mini", help="model name on that server (default gpt-4o-mini)")
    p.add_argument(
        "--judge-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding its API key (default OPENAI_API_KEY; unset: no key sent)",
    )
    p.add_argument("--judge-timeout", type=float, default=timeout, help=f"seconds (default {timeout:g})")
    p.add_argument("--judge-retries", type=int, default=2, help="retries after 429, 5xx, timeouts (default 2)")


# ----- eval -----------------------------------------------------------------------------------
def _add_eval(subparsers) -> None:
    from ..evaluation.loaders import BENCHMARKS

    p = subparsers.add_parser(
        "eval",
        help="generate answers for a safety benchmark into a run folder (resumable)",
        description="Answer every sample of a benchmark with one decoding method and append the answers to "
        "OUT/generations.jsonl (one JSON line per sample, written batch by batch). Rerunning the "
        "same command skips the samples already there; Ctrl-C stops after the batch in flight.",
    )
    p.add_argument("--model", required=True, metavar="PATH_OR_ID", help="a folder written by save_pretrained")
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS, help="the benchmark's layout")
    p.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="its data folder (jsonl: the .jsonl file; hades, msts: a local copy or a hub name, "
        "default the hub data set from the local cache)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the run folder (created; reused to resume)")
    p.add_argument(
        "--split",
        default=None,
        help="a part of the benchmark where it has them: MM-SafetyBench SD, TYPO or SD_TYPO; MSSBench chat or "
        "embodied; FigStep SafeBench or SafeBench-Tiny (any case); HADES and MSTS a hub split (default: "
        "the whole benchmark; FigStep SafeBench, HADES test, MSTS english)",
    )
    p.add_argument(
        "--method",
        default="safecode",
        choices=["safecode", "base", "vcd"],
        help="safecode (default), base (no steering) or vcd (visual contrastive decoding)",
    )
    p.add_argument(
        "--recipe",
        default="paper",
        choices=["paper", "released"],
        help="SafeCoDe as the paper describes it (default) or as the authors' released code decodes "
        "(--method safecode only)",
    )
    p.add_argument(
        "--verdict",
        default="auto",
        type=choice,
        choices=["auto", "unsafe", "safe", "none"],
        help="auto (default) asks the judge for each sample; else the same verdict for all (any case)",
    )
    p.add_argument(
        "--judge",
        default=None,
        choices=["self", "openai"],
        help="who gives the verdicts with --verdict auto: self (the model, default) or openai",
    )
    p.add_argument(
        "--judge-flow",
        default="one-call",
        choices=["one-call", "released"],
        help="how the judge asks: one-call (default) or released (as the authors' released code)",
    )
    _add_judge_server(p, "--judge openai", timeout=30.0)
    p.add_argument(
        "--on-unparseable",
        default="safe",
        type=choice,
        choices=["safe", "unsafe", "none", "raise"],
        help="the verdict when the judge's answer names none (default safe; raise: that sample fails)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="samples per decoder call and per write (default 8)")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="answer length limit (default: the recipe's)")
    p.add_argument("--steer-steps", type=int, default=5, help="steered first tokens (default 5)")
    p.add_argument(
        "--noise-std", type=float, default=0.1, help="noise of the noised image, in [0, 1] pixel units (default 0.1)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the noised images (default 0)")
    p.add_argument(
        "--retry-errors", action="store_true", help="also generate again the samples that failed (default: skip them)"
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (default: the checkpoint's)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "cpu", "triton"],
        help="backend of the step op (default auto)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar on a terminal)")
    ray = p.add_argument_group(
        "scaling out on Ray",
        'the same run on a pool of Ray workers (pip install -e ".[ray]"); '
        "the model (and --data) must be readable on every worker",
    )
    ray.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray: without ADDRESS on a local Ray instance sized from --workers; 'auto' or "
        "ray://HOST:PORT joins that cluster (default: no Ray, run in this process)",
    )
    ray.add_argument(
        "--workers", type=int, default=None, metavar="N", help="workers, each loading the model once (default 1)"
    )
    ray.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        metavar="G",
        help="GPUs of each worker (default 0: CPU workers; with GPUs --device auto is cuda)",
    )
    ray.add_argument("--cpus-per-worker", type=float, default=None, metavar="C", help="CPUs of each worker (default 1)")
    p.set_defaults(handler=_cmd_eval)


def _check_eval_args(args) -> None:
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--limit", args.limit, 0)):
        if value is not None and value < low:
            raise CLIError(f"{flag} must be >= {low}, got {value}")
    check_decoder_args(steer_steps=args.steer_steps, noise_std=args.noise_std, max_new_tokens=args.max_new_tokens)
    check_judge_args(args)
    if args.data is None and args.benchmark not in HUB_BENCHMARKS:
        raise CLIError(
            f"--benchmark {args.benchmark} needs --data (its data folder"
            f"{', the .jsonl file' if args.benchmark == 'jsonl' else ''})"
        )
    if args.method != "safecode":
        if args.recipe != "paper":  # else run.json and every line would record a recipe never used
            raise CLIError(f"--method {args.method} uses no recipe: drop --recipe {args.recipe}")
        if args.verdict not in ("auto", "none"):
            raise CLIError(f"--method {args.method} uses no verdict: drop --verdict {args.verdict}")
        if args.judge is not None:
            raise CLIError(f"--method {args.method} uses no verdict, so --judge {args.judge} would not be asked")
        if args.judge_flow != "one-call":
            raise CLIError(f"--method {args.method} uses no verdict, so no judge flow applies")
    elif args.verdict == "auto":
        args.judge = args.judge or "self"
    elif args.judge is not None:
        raise CLIError(
            f"--verdict {args.verdict} fixes the verdict, so --judge {args.judge} would not be asked: "
            "give one or the other"
        )
    _check_ray_args(args)


def _check_ray_args(args) -> None:
    pool = (
        ("--workers", "workers", 1, 1),
        ("--gpus-per-worker", "gpus_per_worker", 0, 0),
        ("--cpus-per-worker", "cpus_per_worker", 1, None),
    )
    if args.ray is None:
        given = [flag for flag, name, _, _ in pool if getattr(args, name) is not None]
        if given:
            raise CLIError(f"{given[0]} sizes the Ray workers: it goes with --ray")
        return
    for flag, name, default, low in pool:
        value = getattr(args, name)
        if value is None:
            setattr(args, name, value := default)
        if not (value >= low if low is not None else value > 0):
            raise CLIError(f"{flag} must be {f'>= {low}' if low is not None else '> 0'}, got {value:g}")
    if args.device.startswith("cuda") and not args.gpus_per_worker:
        raise CLIError(f"--device {args.device} with --ray needs --gpus-per-worker (Ray gives each worker its GPUs)")


def _judge_config(args) -> dict | None:
    """How the verdicts are given, as ``run.json`` records it (``None``: no judge is asked)."""
    if args.method != "safecode" or args.verdict != "auto":
        return None
    common = {"flow": args.judge_flow, "on_unparseable": args.on_unparseable}
    if args.judge == "self":
        return {"kind": "self", **common}
    return {"kind": "openai", "url": args.judge_url, "model": args.judge_model, **common}


def _load_samples(args):
    from ..evaluation.loaders import load_benchmark

    try:
        samples = load_benchmark(args.benchmark, args.data, split=args.split, limit=args.limit)
    except ValueError as err:  # DataError included: the message names the file and the field
        raise CLIError(_first_line(err)) from None
    except ImportError as err:
        raise CLIError(_first_line(err), code=1) from None
    if not samples:
        raise CLIError(
            f"{args.data}: no samples to run (benchmark {args.benchmark}"
            f"{f', split {args.split}' if args.split else ''}{', --limit 0' if args.limit == 0 else ''})"
        )
    return samples


def _cmd_eval(args) -> int:

    from ..evaluation import ray_run
    from ..evaluation import run as runner
    from ..evaluation.store import CorruptLineError
    from ..judges import JudgeError

    _check_eval_args(args)
    if args.ray is not None:
        try:  # a missing extra fails before anything loads
            ray_run.import_ray()
        except ImportError as err:
            raise CLIError(_first_line(err)) from None
    if args.no_progress or not sys.stderr.isatty():  # bars only on a terminal, never in a log file
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    samples = _load_samples(args)
    model_name = resolve_model(args.model)
    if args.ray is not None:  # the workers' device, not this machine's
        auto = "cuda" if args.gpus_per_worker else "cpu"
        device = auto if args.device == "auto" else resolve_device(args.device, local=False)
    else:
        device = resolve_device(args.device)
        check_backend(args.backend, device)  # Ray workers check theirs where they run
    data = None if args.data is None else (os.path.abspath(args.data) if os.path.exists(args.data) else args.data)
    config = {
        "model": os.path.abspath(model_name) if os.path.isdir(model_name) else model_name,
        "benchmark": args.benchmark,
        "data": data,
        "split": args.split,
        "limit": args.limit,
        "judge": _judge_config(args),
        "device": device,
        "dtype": args.dtype,
    }
    settings = dict(
        method=args.method,
        recipe=args.recipe,
        verdict=args.verdict,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        steer_steps=args.steer_steps,
        noise_std=args.noise_std,
        config=config,
    )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out must be a folder, got a file: {out}")
    try:  # everything that can refuse the run, before the model is loaded
        done = runner.check_resume(out, samples, retry_errors=args.retry_errors, **settings)
    except (ValueError, runner.RecipeUnavailable) as err:  # ConfigMismatch, CorruptLineError: ValueErrors
        raise CLIError(str(err)) from None
    if done == len(samples):
        print(f"{out / 'generations.jsonl'}: all {len(samples)} samples are done; next: safecode-kernels score {out}")
        return 0
    if done and not args.no_progress:
        print(f"resuming: {done} of {len(samples)} samples are already in {out / 'generations.jsonl'}", file=sys.stderr)

    check_architecture(model_name)
    judge = None
    if args.judge == "openai":  # a bad URL fails before the model loads
        judge = make_judge(args)
    if args.ray is not None:
        run = _on_ray(args, samples, out, config, settings)
    else:
        model, processor = load_model(model_name, args.dtype, device)
        if args.judge == "self":
            judge = make_judge(args, model, processor)
        run = functools.partial(
            runner.run_eval,
            model,
            processor,
            samples,
            out,
            judge=judge,
            progress=not args.no_progress,
            retry_errors=args.retry_errors,
            **settings,
        )
    try:
        summary = run()
    except KeyboardInterrupt:
        return _interrupted(out, samples)
    except JudgeError as err:
        raise CLIError(
            f"the {args.judge} judge failed: {_first_line(err)} ({_saved(out, samples)}; "
            "rerunning the same command resumes)",
            code=3,
        ) from None
    except (runner.RunLocked, CorruptLineError, ValueError) as err:
        raise CLIError(str(err)) from None
    except (runner.RunAborted, ray_run.RayRunError) as err:
        raise CLIError(str(err), code=1) from None
    if summary["interrupted"]:
        return _interrupted(out, samples)
    errors = f", {summary['errors']} of them failed (see their 'error')" if summary["errors"] else ""
    workers = f" by {summary['workers']} Ray worker{'s' * (summary['workers'] != 1)}" if args.ray is not None else ""
    print(
        f"{out / 'generations.jsonl'}: {summary['saved']} of {summary['total']} samples "
        f"({summary['written']} new{workers}{errors}); next: safecode-kernels score {out}"
    )
    return 0


#: The flags make_judge reads, sent to the Ray workers (each makes its own judge).
JUDGE_FLAGS = (
    "verdict",
    "judge",
    "judge_flow",
    "judge_url",
    "judge_model",
    "judge_key_env",
    "judge_timeout",
    "judge_retries",
    "on_unparseable",
    "backend",
)


@dataclasses.dataclass(frozen=True)
class RayWorkerModel:
    """What each Ray worker runs once (pickled to it): load the model and processor from the same
    path, and make the judge of the ``eval`` flags (``judge_flags``; ``None``: no judge is asked)."""

    model: str
    dtype: str
    device: str
    judge_flags: dict | None = None

    def __call__(self):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar per worker would garble the driver's terminal
        model, processor = load_model(self.model, self.dtype, self.device)
        judge = None
        if self.judge_flags is not None:
            judge = make_judge(argparse.Namespace(**self.judge_flags), model, processor)
        return model, processor, judge


def _on_ray(args, samples, out: Path, config: dict, settings: dict):
    """The Ray run of ``eval --ray``, ready to call."""
    from ..evaluation import ray_run
    from ..evaluation.loaders import load_benchmark

    asks_judge = args.judge in ("self", "openai")
    load = RayWorkerModel(
        config["model"],
        args.dtype,
        config["device"],
        {name: getattr(args, name) for name in JUDGE_FLAGS} if asks_judge else None,
    )
    reopen = None
    if args.benchmark in HUB_BENCHMARKS:  # their images are read through the data set, on each worker
        reopen = functools.partial(load_benchmark, args.benchmark, config["data"], split=args.split, limit=args.limit)
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # not a line per data set started and finished
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled": ours counts
    return functools.partial(
        ray_run.run_eval_ray,
        load,
        samples,
        out,
        address=args.ray or None,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        reopen=reopen,
        progress=not args.no_progress,
        retry_errors=args.retry_errors,
        **settings,
    )


def _saved(out: Path, samples) -> str:
    from ..evaluation.store import read_lines

    try:
        ids = {str(r.get("id")) for r in read_lines(out / "generations.jsonl")}
    except (OSError, ValueError):
        ids = set()
    return f"{sum(s.id in ids for s in samples)} of {len(samples)} samples are saved in {out / 'generations.jsonl'}"


def _interrupted(out: Path, samples) -> int:
    print(f"interrupted: {_saved(out, samples)}; rerun the same command to resume", file=sys.stderr)
    return 130


# ----- score ----------------------------------------------------------------------------------
def _add_score(subparsers) -> None:
    p = subparsers.add_parser(
        "score",
        help="judge a run's answers and write its report",
        description="Judge every answer of the run folder DIR (generations.jsonl) and write scores.jsonl, "
        "report.json, report.md and report.png there. Resumable: judged samples are skipped.",
    )
    p.add_argument("dir", metavar="DIR", help="a run folder written by `safecode-kernels eval`")
    p.add_argument(
        "--scorer",
        default="llm",
        choices=["llm", "refusal-strings"],
        help="llm (default): a judge model with the benchmark's rubric; refusal-strings: refusal "
        "phrases, no judge (refusal rates only)",
    )
    _add_judge_server(p, "the judge", timeout=60.0)
    p.add_argument(
        "--judge-template",
        default=None,
        metavar="FILE",
        help="a judge prompt with {question} and {response}, replacing the benchmark's (default: the benchmark's)",
    )
    p.add_argument("--judge-concurrency", type=int, default=8, help="judge requests in flight (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar on a terminal)")
    p.set_defaults(handler=_cmd_score)


def _cmd_score(args) -> int:
    from ..evaluation.scoring import ChatClient, render_markdown, score
    from ..judges import JudgeError

    if args.judge_concurrency < 1:
        raise CLIError(f"--judge-concurrency must be >= 1, got {args.judge_concurrency}")
    check_judge_args(args)
    if args.scorer != "llm" and args.judge_template is not None:
        raise CLIError("--judge-template is a judge prompt: it needs --scorer llm")
    if not os.path.isdir(args.dir):
        raise CLIError(f"run folder not found: {args.dir}")
    client = None
    if args.scorer == "llm":
        try:
            client = ChatClient(
                args.judge_url,
                args.judge_model,
                api_key_env=args.judge_key_env,
                timeout=args.judge_timeout,
                max_retries=args.judge_retries,
            )
        except ValueError as err:
            raise CLIError(f"--judge-url/--judge-model: {err}") from None
        problem = client.missing_key()
        if problem is not None:  # bad input, found before any request
            raise CLIError(f"--judge-key-env: {problem}")
    try:
        report = score(
            args.dir,
            judge=client,
            scorer=args.scorer,
            judge_template=args.judge_template,
            concurrency=args.judge_concurrency,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print(
            f"interrupted: the judgements finished so far are saved in {Path(args.dir) / 'scores.jsonl'}; "
            "rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
    except JudgeError as err:
        raise CLIError(
            f"the judge failed: {_first_line(err)} (the judgements finished so far are saved; rerunning "
            "the same command resumes)",
            code=3,
        ) from None
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(_first_line(err)) from None
    finally:
        if client is not None:
            client.close()
    print(render_markdown(report), end="")
    print(f"\nwritten: {', '.join(str(Path(args.dir) / n) for n in ('report.json', 'report.md', 'report.png'))}")
    return 0


# ----- report ---------------------------------------------------------------------------------
def _add_report(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="the metrics of scored runs side by side",
        description="Print a markdown table of the metrics of each scored run folder "
        "(their report.json, written by `safecode-kernels score`).",
    )
    p.add_argument("dirs", nargs="+", metavar="DIR", help="scored run folders")
    p.set_defaults(handler=_cmd_report)


def _cmd_report(args) -> int:
    from ..evaluation.scoring import compare

    try:
        print(compare(args.dirs), end="")
    except (FileNotFoundError, ValueError) as err:
        raise CLIError(_first_line(err)) from None
    return 0


__all__ = ["register"]
