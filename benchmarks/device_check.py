"""One device check: a few minutes on a CUDA GPU turned into the figures no CPU can give
(docs/design.md §6). Four parts, each in its own subprocess with its own time limit, so that a
crash, a hang or a CUDA error in one loses none of the others' results:

- ``grid``: the Triton step tests (``tests/ops/test_step_triton*.py``) on CUDA tensors, their
  ``gpu``-marked full grid included, then the other tests that need CUDA (``GPU_TESTS``):
  passed / failed / skipped counts and the failing tests;
- ``step``: ``benchmarks/bench_step.py --device cuda`` through its command line: time of
  ``torch`` and ``triton`` per case, their ratio and the share of the card's peak bandwidth;
- ``decoder``: :class:`SafeCoDeDecoder` on CUDA in bf16. First the blocking host syncs per
  decoding step (:func:`host_syncs`): the tiny LLaVA under both recipes, greedy and sampled,
  with the decoder's own reads (``_read_step`` calls), the warnings of
  ``torch.cuda.set_sync_debug_mode("warn")`` in the step loop and outside it, and where each
  sync came from; then, with ``sdpa`` and with ``eager`` attention, every family's tiny model
  and the benchmark-size LLaVA (576 image tokens): each batch against each of its requests
  alone (token agreement, NaN anywhere, errors);
- ``e2e``: the end-to-end decoding benchmark (``safecode_kernels.app.benchmarking.decode``) on
  the LLaVA-1.5-7B shape with random bf16 weights and 576 image tokens: naive, two-cache,
  fused and plain (with the decoder without steering and the noised prefill, for the lower
  bound), B = 1 and 8, the steered phase and a 64-token answer.

Usage::

    python benchmarks/device_check.py --out DIR            # on a CUDA machine: under 8 minutes
    python benchmarks/device_check.py --dry-run --out DIR  # the same code on the CPU, tiny sizes

``DIR/device_check.json`` and ``DIR/device_check.md`` are rewritten after every part; each
part's own files (its log, pytest's report, bench_step's JSON, the decode benchmark's report)
are under ``DIR/<part>/``. Needs no network. The dry run uses tiny models and the CPU; the
Triton tests run in Triton's interpreter there (a few of them), or are skipped with the reason
when Triton is missing. Nothing here asserts a time; the exit status is 0 when every part ran to its end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import glob
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("grid", "step", "decoder", "e2e")
#: Seconds each part may take on the GPU (the end-to-end part also gets what the others leave);
#: together under the 8 minutes a device check may take, with room for the process starts.
BUDGETS = {"grid": 170, "step": 70, "decoder": 60, "e2e": 150}
TOTAL = 455
DRY_BUDGETS = {"grid": 90, "step": 120, "decoder": 90, "e2e": 90}
DRY_TOTAL = 390
#: What the step part asks of bench_step.py (it runs what its command line offers).
STEP_BATCHES = (1, 16, 64, 256)
STEP_VOCABS = (32000, 152064)
STEP_DTYPES = ("bf16", "fp32")
#: The tests beyond the Triton files that need CUDA (skipped on a CPU machine, so never run in
#: CI), or whose cases take the GPU's backends there: the grid part runs them after the Triton files.
GPU_TESTS = (
    "tests/ops/test_step_temperature.py",
    "tests/test_verdict.py",
    "tests/decoding/test_host_to_device.py",
    "tests/decoding/test_released.py::test_cuda_generator_spellings_sample_alike",
)
#: The Triton tests the dry run runs in the interpreter (a few seconds' worth).
DRY_GRID_TESTS = "unavailable_reason or no_refusal_tokens"
#: The families and request batches of the decoder part's dry run (M-RoPE and plain positions).
DRY_FAMILIES = ("llava", "qwen2_vl")
DRY_PREFIXES = ("mixed",)
#: The host-sync measurement (:func:`host_syncs`): the family whose tiny model it runs, the
#: tokens of each answer, the steered steps, the (recipe, sampled) cases and how many distinct
#: places of syncs the report shows per case (the JSON record keeps them all).
SYNC_FAMILY = "llava"
SYNC_TOKENS = 8
SYNC_STEER_STEPS = 3
SYNC_CASES = (("paper", False), ("paper", True), ("released", False), ("released", True))
SYNC_SAMPLING = dict(temperature=0.8, top_p=0.9)
SYNC_SITES = 6
#: The decoder's step loop: ``_Run``'s methods a decoding step runs, in order.
STEP_METHODS = ("choose", "drop_rows", "decode_step")
#: What ``torch.cuda.set_sync_debug_mode("warn")`` warns (c10/cuda/CUDAFunctions.h).
_SYNC_WARNING = "synchronizing CUDA operation"
#: The warnings module's files, whose frames sit between a warning's place and its display.
_WARNINGS_FILES = ("warnings.py", "_py_warnings.py")


# ------------------------------------------------------------------------------------------
# The driver: one subprocess per part


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\nUsage::")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="folder for the results (created)")
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU with tiny sizes")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts (default all)")
    parser.add_argument(
        "--total",
        type=float,
        default=None,
        help=f"seconds for all parts together (default {TOTAL}, {DRY_TOTAL} with --dry-run)",
    )
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # run one part in this process
    parser.add_argument("--seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    if args.part:
        return run_part(args.part, out, args.dry_run, args.seconds)

    os.makedirs(os.path.join(out, "parts"), exist_ok=True)
    if not args.dry_run and not cuda_available():
        print("device_check: no CUDA device here; run it on a GPU machine, or use --dry-run", file=sys.stderr)
        return 2
    budgets = DRY_BUDGETS if args.dry_run else BUDGETS
    report = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        dry_run=args.dry_run,
        machine=machine(),
        budgets_s={name: budgets[name] for name in args.parts},
        parts={},
    )
    write_report(report, out)
    deadline = time.monotonic() + (args.total or (DRY_TOTAL if args.dry_run else TOTAL))
    for name in args.parts:
        left = deadline - time.monotonic()
        # The last part also gets the time the others did not use.
        seconds = left if name == args.parts[-1] else min(budgets[name], left)
        if seconds < 5:
            report["parts"][name] = dict(status="skipped", reason="no time left", seconds=0.0)
        else:
            report["parts"][name] = launch(name, out, args.dry_run, seconds)
        write_report(report, out)
        print(f"device_check: {name}: {report['parts'][name]['status']}", file=sys.stderr, flush=True)
    print(markdown(report))
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def launch(name: str, out: str, dry_run: bool, seconds: float) -> dict:
    """Run part ``name`` in a subprocess for at most ``seconds``; what it recorded, with its status."""
    os.makedirs(os.path.join(out, name), exist_ok=True)
    record_path = os.path.join(out, "parts", f"{name}.json")
    if os.path.exists(record_path):
        os.remove(record_path)
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--out", out, "--seconds", str(seconds)]
    cmd += ["--dry-run"] if dry_run else []
    log_path = os.path.join(out, name, "log.txt")
    start = time.monotonic()
    with open(log_path, "w") as log:
        # A session of its own: on a timeout the whole group goes (pytest's children too).
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
        try:
            rc = proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    entry = read_json(record_path) or {}
    entry.update(seconds=round(time.monotonic() - start, 1), timeout_s=round(seconds, 1), log=f"{name}/log.txt")
    if rc is None:
        entry["status"] = "timed out"
    elif rc != 0 and entry.get("status") in (None, "running"):
        entry.update(status="crashed", error=f"exit status {rc}; the end of its log: {tail(log_path)}")
    return entry


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; fail fast if something tries
    return env


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def machine() -> str:
    """The card (from nvidia-smi, so that this process never holds a CUDA context), the CPU
    count and the library versions (from the installed packages' metadata: no imports)."""
    from importlib.metadata import PackageNotFoundError, version

    card = "no CUDA device"
    try:
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
        card = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip() or card
    except (OSError, subprocess.SubprocessError):
        pass
    versions = [f"Python {platform.python_version()}"]
    for package in ("torch", "triton", "transformers"):
        try:
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            versions.append(f"no {package}")
    return f"{card}; {os.cpu_count()} logical CPUs; " + ", ".join(versions)


# ------------------------------------------------------------------------------------------
# One part, in its own process


class Part:
    """What a part knows (its folder, the dry-run flag, its deadline) and its record, written
    to ``parts/<name>.json`` every time it changes so that a killed part keeps what it did."""

    def __init__(self, name: str, out: str, dry_run: bool, seconds: float):
        self.name, self.out, self.dry_run = name, out, dry_run
        self.dir = os.path.join(out, name)
        self.deadline = time.monotonic() + seconds
        self.record = dict(status="running", result={})
        self.device = "cpu" if dry_run else "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self, **fields) -> None:
        self.record.update(fields)
        path = os.path.join(self.out, "parts", f"{self.name}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.record, f, indent=2, default=str)
        os.replace(path + ".tmp", path)


def run_part(name: str, out: str, dry_run: bool, seconds: float) -> int:
    part = Part(name, out, dry_run, seconds)
    part.save()
    if dry_run:  # tiny models gain nothing from threads, and spinning ones stall a busy machine
        import torch

        torch.set_num_threads(1)
    try:
        outcome = {"grid": part_grid, "step": part_step, "decoder": part_decoder, "e2e": part_e2e}[name](part)
    except Exception as err:  # recorded for the report; the other parts go on
        part.save(status="failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
        traceback.print_exc()
        return 1
    part.save(status=outcome or "ok")
    return 0


def subprocess_with_deadline(part: Part, cmd: list[str], log_name: str, margin: float = 5.0):
    """``(exit status or None on a timeout, log path)`` of ``cmd``, stopped before the part's deadline."""
    log_path = os.path.join(part.dir, log_name)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, part.left() - margin)), log_path
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, log_path


# ----- (a) the Triton tests on the GPU ------------------------------------------------------

_OUTCOME = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def part_grid(part: Part) -> str | None:
    files = sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "tests/ops/test_step_triton*.py")))
    files += list(GPU_TESTS)  # after the Triton files: a part cut short by its time limit keeps those
    cmd = [sys.executable, "-m", "pytest", *files, "-v", "-rfEs", "-p", "no:cacheprovider"]
    if part.dry_run:  # a few tests in the interpreter (tests/conftest.py switches it on without a GPU)
        cmd += ["-k", DRY_GRID_TESTS]
    part.save(result=dict(files=files, command=" ".join(cmd[1:])))
    rc, log_path = subprocess_with_deadline(part, cmd, "pytest.txt")
    with open(log_path, errors="replace") as f:
        text = f.read()
    counts: dict[str, int] = {}
    failing = []
    for line in text.splitlines():
        match = _OUTCOME.match(line)
        if match:
            test, outcome = match.groups()
            counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
            if outcome in ("FAILED", "ERROR"):
                failing.append(test)
    skip_reasons = sorted(set(re.findall(r"^SKIPPED \[\d+\] \S+: (.*)$", text, flags=re.M)))
    summary = re.findall(r"^=+ (.*(?:passed|failed|skipped|error|no tests ran).*) =+$", text, flags=re.M)
    part.save(
        result=dict(
            part.record["result"],
            counts=counts,
            failing=failing,
            skip_reasons=skip_reasons,
            summary=summary[-1] if summary else None,
            exit_status=rc,
            finished=rc is not None,
        )
    )
    if rc is None:
        return "timed out"
    # pytest: 0 all passed, 1 some failed, 5 nothing collected / selected.
    return "ok" if rc in (0, 1, 5) else "failed"


# ----- (b) bench_step.py on the GPU ----------------------------------------------------------


def part_step(part: Part) -> str | None:
    script = os.path.join(REPO, "benchmarks", "bench_step.py")
    json_path = os.path.join(part.dir, "bench_step.json")
    help_text = subprocess.run(
        [sys.executable, script, "--help"], capture_output=True, text=True, cwd=REPO, timeout=120
    ).stdout
    # The dry run takes the GPU code path too (Triton's interpreter on CPU tensors).
    cmd = [sys.executable, script, "--device", "cuda", "--json", json_path]
    notes = []
    if part.dry_run:
        cmd += ["--dry-run", "--threads", "1"]
    elif "--batches" in help_text:
        cmd += ["--batches", *map(str, STEP_BATCHES)]
    else:
        notes.append("bench_step.py has no --batches option: only the batch sizes it runs by default")
    part.save(result=dict(command=" ".join(cmd[1:]), notes=notes))
    if os.path.exists(json_path):
        os.remove(json_path)
    rc, _ = subprocess_with_deadline(part, cmd, "bench_step.txt")
    data = read_json(json_path)
    if data is None:
        part.save(error=f"bench_step.py wrote no JSON (exit status {rc}); see {part.name}/bench_step.txt")
        return "timed out" if rc is None else "failed"
    rows = data.get("results", [])
    wanted = [(b, v, d) for b in STEP_BATCHES for v in STEP_VOCABS for d in STEP_DTYPES]
    measured = {(r.get("batch"), r.get("vocab"), r.get("dtype")) for r in rows}
    if not part.dry_run:
        missing = [f"B={b} V={v} {d}" for b, v, d in wanted if (b, v, d) not in measured]
        if missing:
            notes.append("not measured: " + ", ".join(missing))
    keep = ("case", "torch_ms", "fast_ms", "kernel_ms", "ratio", "fast_gbps", "fast_peak_share", "fast_backend")
    table = [{k: r.get(k) for k in keep} for r in rows]
    result = dict(machine=data.get("machine"), peak_gbps=data.get("peak_gbps"), rows=table, notes=notes)
    part.save(result=dict(part.record["result"], exit_status=rc, **result))
    return "ok" if rc == 0 else "failed"


# ----- (c) the decoder on the GPU in bf16, sdpa and eager --------------------------------------


def part_decoder(part: Part) -> str | None:
    import torch

    from safecode_kernels.decoding import SafeCoDeDecoder
    from safecode_kernels.decoding.noise import noised_views
    from safecode_kernels.refusal import RefusalVocabulary
    from safecode_kernels.testing.tiny_models import BUILDERS, PARAMS, batch, refusal_ids

    if not part.dry_run:
        part.save(result=dict(card=torch.cuda.get_device_name()))
    # First, so that the part's time limit never leaves it out (a few seconds on the GPU).
    try:
        syncs = host_syncs(part.device)
    except Exception as err:  # the batched-against-alone rows below still run
        syncs = dict(error=f"{type(err).__name__}: {str(err)[:300]}")
        traceback.print_exc()
    part.save(result=dict(part.record["result"], host_syncs=syncs))
    rows = []
    families, prefixes = (DRY_FAMILIES, DRY_PREFIXES) if part.dry_run else (BUILDERS, ("shared", "none", "mixed"))
    models = [(family, BUILDERS[family], prefixes) for family in families]
    spec = _bench_spec(part.dry_run)
    name = f"llava, benchmark size ({spec.image_tokens} image tokens)"
    models.append((name, functools.partial(_bench_llava, spec), ("bench",)))
    for family, build, prefixes in models:
        if part.left() < 10:
            rows.append(dict(model=family, error="not run: the part's time ran out"))
            continue
        try:
            model, processor = build()
            model = model.to(part.device, torch.bfloat16)
        except Exception as err:
            rows.append(dict(model=family, error=f"building: {type(err).__name__}: {err}"))
            part.save(result=dict(part.record["result"], rows=rows))
            continue
        refusal = RefusalVocabulary(refusal_ids(processor.tokenizer))
        for attention in ("sdpa", "eager"):
            row = dict(model=family, attention=attention, requests=0, tokens=0, agreeing=0, identical=0, nan=False)
            try:
                model.set_attn_implementation(attention)
                decoder = SafeCoDeDecoder(model, processor, PARAMS, steer_steps=3, refusal=refusal, min_shared_prefix=1)
                for prefix in prefixes:
                    images, prompts, verdicts, kwargs = (
                        _bench_batch(processor) if prefix == "bench" else batch(processor, prefix)
                    )
                    _compare(decoder, images, prompts, verdicts, kwargs, noised_views(images, 0.1, seed=0), row)
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            row["agreement"] = row["agreeing"] / row["tokens"] if row["tokens"] else None
            rows.append(row)
            part.save(result=dict(part.record["result"], rows=rows))
        del model
        if not part.dry_run:
            torch.cuda.empty_cache()
    return None


def _compare(decoder, images, prompts, verdicts, kwargs, noised, row: dict) -> None:
    """Add to ``row`` the batched answers' agreement with each request's answer alone."""
    kwargs = dict(kwargs, noised_images=noised, max_new_tokens=8, return_logits=True)
    batched = decoder.generate(images, prompts, verdicts, **kwargs)
    row["nan"] |= _has_nan(batched)
    for i in range(len(images)):
        one = {k: [v[i]] if isinstance(v, list) else v for k, v in kwargs.items()}
        alone = decoder.generate([images[i]], [prompts[i]], [verdicts[i]], **one)
        row["nan"] |= _has_nan(alone)
        a, b = batched.sequences[i], alone.sequences[0]
        row["requests"] += 1
        row["tokens"] += max(len(a), len(b))
        row["agreeing"] += sum(x == y for x, y in zip(a, b))
        row["identical"] += a == b


def _has_nan(result) -> bool:
    tensors = [t for name in ("logits", "noised_logits") for t in (getattr(result, name) or [])]
    return any(bool(t.isnan().any()) for t in tensors if t.numel())


def _bench_spec(dry_run: bool):
    """The benchmark's LLaVA (hidden 512, 576 image tokens), or its smoke size in a dry run."""
    from safecode_kernels.app.benchmarking.models import BENCH, TINY

    return TINY if dry_run else BENCH


def _bench_llava(spec):
    from safecode_kernels.app.benchmarking.models import build_llava

    return build_llava(spec)


def _bench_batch(processor):
    """Four benchmark requests of different lengths, two with a system prompt (text to share)."""
    from safecode_kernels.app.benchmarking.models import bench_requests, system_prompt

    images, prompts, verdicts = bench_requests(4)
    system = [system_prompt(processor.tokenizer, 60), None, "Be brief.", None]
    return images, prompts, verdicts, dict(system_prompt=system)


def host_syncs(device: str) -> dict:
    """How often the decoder blocks the host per decoding step on ``device`` (``"cuda"``, or
    ``"cpu"`` in a dry run): the tiny model of :data:`SYNC_FAMILY` in bf16 with ``sdpa``
    attention, three requests (unsafe, safe, none; system prompts, so a shared prefix),
    :data:`SYNC_TOKENS` tokens each (no end-of-sequence token) of which :data:`SYNC_STEER_STEPS`
    are steered, under each recipe, greedy and sampled (:data:`SYNC_CASES`).

    Each case runs ``generate`` twice with the same seed and counts in the second (the first pays
    for the one-off work: Triton's compilation, the refusal masks, the allocator's growth):
    ``steps`` (``_Run.choose`` calls, one per token of the longest answer, more when the
    released recipe's corruption guard cuts a prefix), ``decoder_reads`` (``_read_step`` calls:
    the one device-to-host read a step is designed to make; reads a recipe makes by other means
    show only as syncs) and, on CUDA only, the warnings of
    ``torch.cuda.set_sync_debug_mode("warn")`` (every blocking copy or synchronization torch
    makes) by where they were raised: in the step loop (:data:`STEP_METHODS`) or outside it
    (setup, prefill, the result), with every distinct place that raised them (``sites``).
    Elsewhere the sync counts are ``None`` and ``cuda_syncs_reason`` says why.

    Returns a dict: the settings and ``cases``, one dict per case (``error`` where it failed).
    """
    import copy

    import torch

    from safecode_kernels.decoding import SafeCoDeDecoder
    from safecode_kernels.refusal import RefusalVocabulary
    from safecode_kernels.testing.tiny_models import BUILDERS, PARAMS, batch, refusal_ids

    model, processor = BUILDERS[SYNC_FAMILY]()
    # A copy: the builders hand out one cached instance, which other callers expect in fp32.
    model = copy.deepcopy(model).to(device, torch.bfloat16)
    model.set_attn_implementation("sdpa")
    images, prompts, verdicts, kwargs = batch(processor, "shared")
    on_cuda = torch.device(device).type == "cuda"
    record = dict(
        model=f"{SYNC_FAMILY} (tiny), bf16, sdpa",
        device=torch.cuda.get_device_name(device) if on_cuda else device,
        requests=len(images),
        tokens=SYNC_TOKENS,
        steer_steps=SYNC_STEER_STEPS,
        cuda_syncs_reason=None if on_cuda else "no CUDA device",
        cases=[],
    )
    for recipe, sampled in SYNC_CASES:
        case = dict(recipe=recipe, sampling="sampled" if sampled else "greedy")
        try:
            # The paper's recipe with the tiny vocabulary's refusal tokens; the released one with
            # its own phrases' ids.
            refusal = RefusalVocabulary(refusal_ids(processor.tokenizer)) if recipe == "paper" else None
            decoder = SafeCoDeDecoder(
                model, processor, PARAMS, steer_steps=SYNC_STEER_STEPS, refusal=refusal, recipe=recipe
            )
            settings = dict(kwargs, max_new_tokens=SYNC_TOKENS, eos_token_id=[], do_sample=sampled)
            settings.update(SYNC_SAMPLING if sampled else {})
            call = functools.partial(decoder.generate, images, prompts, verdicts, **settings)
            call()
            case.update(_count_syncs(call, _sync_debug_warn if on_cuda else None))
        except Exception as err:  # recorded; the other cases go on
            case["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            traceback.print_exc()
        record["cases"].append(case)
    return record


def _count_syncs(call, sync_debug) -> dict:
    """Run ``call`` (a ``generate``) once, counting the steps, the decoder's reads and the sync
    warnings, each tagged with the step-loop method running when it came (``"outside"``: none).
    ``sync_debug``: a context manager factory that makes torch warn on every sync for its block
    (:func:`_sync_debug_warn`), or ``None`` where syncs cannot be counted (their counts are then
    ``None``). ``_read_step`` and the ``_Run`` methods are wrapped for the call only."""
    from safecode_kernels.decoding import decoder as decoder_module

    run_class, real_read = decoder_module._Run, decoder_module._read_step
    methods = {name: vars(run_class)[name] for name in STEP_METHODS}
    where = ["outside"]  # the innermost step-loop method running
    calls = dict.fromkeys(STEP_METHODS, 0)
    reads: dict[str, int] = {}
    syncs: list[tuple[str, str, str]] = []  # (where, site, stack)
    other_warnings = []

    def read_step(values):
        reads[where[-1]] = reads.get(where[-1], 0) + 1
        return real_read(values)

    def tagged(name, method):
        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            calls[name] += 1
            where.append(name)
            try:
                return method(*args, **kwargs)
            finally:
                where.pop()

        return wrapper

    def show(message, category, filename, lineno, file=None, line=None):
        # torch raises its warning from the innermost Python frame that called the op.
        if _SYNC_WARNING in str(message):
            syncs.append((where[-1], f"{_short_path(filename)}:{lineno}", _warning_stack()))
        else:
            other_warnings.append(f"{category.__name__}: {str(message).splitlines()[0][:200]}")

    decoder_module._read_step = read_step
    try:
        for name, method in methods.items():
            setattr(run_class, name, tagged(name, method))
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")  # every sync, not once per place
            warnings.showwarning = show  # catch_warnings restores it
            with sync_debug() if sync_debug is not None else contextlib.nullcontext():
                result = call()
    finally:
        decoder_module._read_step = real_read
        for name, method in methods.items():
            setattr(run_class, name, method)

    steps = calls["choose"]
    case = dict(
        steps=steps,
        decode_steps=calls["decode_step"],
        tokens=sum(len(tokens) for tokens in result.sequences),
        decoder_reads=sum(reads.values()),
        decoder_reads_by_place=reads,
        reads_per_step=round(sum(n for w, n in reads.items() if w != "outside") / steps, 3) if steps else None,
        other_warnings=sorted(set(other_warnings))[:5],
    )
    if sync_debug is None:
        return dict(case, cuda_syncs=None, cuda_syncs_by_place=None, cuda_syncs_per_step=None, sites=[])
    by_place = {name: sum(w == name for w, _, _ in syncs) for name in (*STEP_METHODS, "outside")}
    in_steps = len(syncs) - by_place["outside"]
    sites: dict[str, dict] = {}  # by first appearance
    for w, site, stack in syncs:
        entry = sites.setdefault(site, dict(site=site, count=0, where={}, stack=stack))
        entry["count"] += 1
        entry["where"][w] = entry["where"].get(w, 0) + 1
    return dict(
        case,
        cuda_syncs=len(syncs),
        cuda_syncs_by_place=by_place,
        cuda_syncs_per_step=round(in_steps / steps, 3) if steps else None,
        sites=list(sites.values()),
    )


@contextlib.contextmanager
def _sync_debug_warn():
    """``torch.cuda.set_sync_debug_mode("warn")`` for the block; the previous mode after it."""
    import torch

    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def _warning_stack(depth: int = 4) -> str:
    """The Python stack where the warning being shown was raised, innermost first: its place
    and then up to ``depth`` frames of this package (the decoder's path to it), as
    ``file:line function`` joined by `` < ``; this script's and the warnings module's frames left out."""
    here = os.path.abspath(__file__)
    frames = [
        f
        for f in reversed(traceback.extract_stack())
        if os.path.abspath(f.filename) != here and os.path.basename(f.filename) not in _WARNINGS_FILES
    ]
    if not frames:
        return ""
    package = os.path.join(REPO, "safecode_kernels") + os.sep
    ours = [f for f in frames[1:] if os.path.abspath(f.filename).startswith(package)][:depth]
    return " < ".join(f"{_short_path(f.filename)}:{f.lineno} {f.name}" for f in [frames[0], *ours])


def _short_path(path: str) -> str:
    """``path`` from the repository, or from the installed packages' folder, else as is."""
    full = os.path.abspath(path)
    if full.startswith(REPO + os.sep):
        return os.path.relpath(full, REPO)
    for marker in ("site-packages", "dist-packages"):
        if f"{os.sep}{marker}{os.sep}" in full:
            return full.split(f"{os.sep}{marker}{os.sep}", 1)[1]
    return path


# ----- (d) the end-to-end benchmark on the LLaVA-1.5-7B shape ----------------------------------


def llava_7b_spec():
    """LLaVA-1.5-7B's shape: Llama-2-7B (hidden 4096, 32 layers, 32 heads, MLP 11008, vocabulary
    32000) and CLIP ViT-L/14 at 336 pixels (hidden 1024, 24 layers, 16 heads, MLP 4096, 576
    image tokens), as in the released checkpoint's config."""
    from safecode_kernels.app.benchmarking.models import LlavaSpec

    return LlavaSpec(
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        vocab_size=32000,
        image_size=336,
        patch_size=14,
        vision_hidden_size=1024,
        vision_intermediate_size=4096,
        vision_layers=24,
        vision_heads=16,
        name="llava-1.5-7b-shape",
    )


def part_e2e(part: Part) -> str | None:
    import torch

    from safecode_kernels.app.benchmarking import decode as bench
    from safecode_kernels.app.benchmarking import models

    if part.dry_run:
        settings = bench.Settings(spec=models.TINY, batches=(1, 2), systems=(False,), reps=1, answer_tokens=8)
    else:
        settings = bench.Settings(spec=llava_7b_spec(), batches=(1, 8), systems=(False,), reps=2, answer_tokens=64)
    dtype = torch.bfloat16
    start = time.monotonic()
    # Built on the device itself: random init of 7B weights on a CPU takes minutes.
    if settings.spec.tokenizer == "bench":
        models.build_tokenizer(settings.spec.vocab_size)  # trained (and cached) outside the device context
    with torch.device(part.device):
        model, processor = models.build_llava(settings.spec, settings.seed)
    model.to(dtype)
    info = dict(
        model=settings.spec.describe().replace("fp32", "bf16"),
        dtype="bf16",
        device=torch.cuda.get_device_name() if part.device == "cuda" else "cpu",
        build_seconds=round(time.monotonic() - start, 1),
    )
    part.save(result=info)
    work = _device_workload()(model, processor, 1, None, settings)
    for name in bench.DECODERS:  # first calls pay for compilation, allocator growth, lazy imports
        work.run(name, 2)
    work.noised_prefill()
    results, lengths = [], {}
    for batch in settings.batches:
        work = _device_workload()(model, processor, batch, None, settings)
        lengths[f"B={batch} nosys"] = work.prompt_lengths()
        for phase in settings.phases:
            results.append(bench.measure_case(work, bench.Case(phase, batch, False), settings, log=print))
            report = bench.make_report(settings, results, lengths)
            report.update(model_short=info["model"], device=info["device"])
            paths = bench.write_report(report, part.dir)
            part.save(result=dict(info, cases=[_case_summary(r) for r in results], files=sorted(paths.values())))
    return None


@functools.cache
def _device_workload():
    """The benchmark's workload with the model's own ``generate`` fed on the model's device and
    in its dtype, and the noised prefill timed to the end of its GPU work."""
    from safecode_kernels.app.benchmarking import decode as bench

    class DeviceWorkload(bench.Workload):
        def plain_inputs(self):
            return super().plain_inputs().to(device=self.model.device, dtype=self.model.dtype)

        def noised_prefill_call(self):
            call = super().noised_prefill_call()

            def synchronized():
                out = call()
                _synchronize(out)
                return out

            return synchronized

    return DeviceWorkload


def _synchronize(tensor) -> None:
    import torch

    if tensor is not None and tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def _case_summary(result: dict) -> dict:
    seconds, ratios = result["seconds"], result["ratios"]
    return dict(
        case=result["case"],
        seconds={k: round(v, 4) for k, v in seconds.items()},
        fused_speedup_vs_naive=ratios["fused_speedup_vs_naive"],
        fused_speedup_vs_two_cache=ratios["fused_speedup_vs_two_cache"],
        fused_vs_plain=ratios["fused_vs_plain"],
        fused_vs_lower_bound=ratios["fused_vs_lower_bound"],
        steered_ids_agree=result["steered_ids_agree"],
        plain_ids_agree=result["plain_ids_agree"],
    )


# ------------------------------------------------------------------------------------------
# The report


def write_report(report: dict, out: str) -> None:
    with open(os.path.join(out, "device_check.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    with open(os.path.join(out, "device_check.md"), "w") as f:
        f.write(markdown(report))


def markdown(report: dict) -> str:
    kind = "dry run on the CPU (tiny sizes, no GPU figures)" if report["dry_run"] else "on CUDA"
    lines = [f"# Device check: {kind}", "", f"{report['date']}; {report['machine']}", ""]
    if report["dry_run"]:
        lines += [
            "This dry run checks that every part runs; its figures mean nothing. On a CUDA machine run "
            "`python benchmarks/device_check.py --out DIR` (under 8 minutes, no network) for the GPU figures.",
            "",
        ]
    lines += [
        "Reading it: grid, every test passed (a failure names the test); step, the fused kernel's share "
        "of the card's peak bandwidth (higher is better) and torch / fused (above 1: the fused op is faster); "
        "decoder, token agreement of batched against one-at-a-time answers (1.000 in fp32; in bf16 padded "
        "and unpadded rows run other kernels, so a little below 1 can be rounding) and one read per "
        "decoding step; e2e, fused against the naive and two-cache loops on the LLaVA-1.5-7B shape.",
        "",
    ]
    lines += ["| part | status | seconds (limit) | |", "|---|---|---:|---|"]
    for name, p in report["parts"].items():
        note = p.get("error") or p.get("reason") or ""
        note = note.splitlines()[0][:160] if note else ""
        lines.append(f"| {name} | {p['status']} | {p.get('seconds', 0)} ({p.get('timeout_s', '-')}) | {note} |")
    for name, p in report["parts"].items():
        result = p.get("result") or {}
        lines += ["", f"## {name}", ""]
        lines += {"grid": _md_grid, "step": _md_step, "decoder": _md_decoder, "e2e": _md_e2e}[name](result)
    return "\n".join(lines) + "\n"


def _md_grid(r: dict) -> list[str]:
    counts = ", ".join(f"{v} {k}" for k, v in sorted(r.get("counts", {}).items())) or "none"
    lines = [f"Files: {', '.join(r.get('files', []))}. Outcomes: {counts}."]
    if "-k" in r.get("command", "").split():
        lines.append("Dry run: a few of these tests, in Triton's interpreter; the full grid needs a GPU.")
    if r.get("summary"):
        lines.append(f"pytest: {r['summary']}" + ("" if r.get("finished", True) else " (stopped at the time limit)"))
    lines += [f"- failing: `{t}`" for t in r.get("failing", [])]
    lines += [f"- skipped: {reason}" for reason in r.get("skip_reasons", [])]
    return lines


def _md_step(r: dict) -> list[str]:
    peak = r.get("peak_gbps")
    on_card = any(row.get("fast_peak_share") is not None for row in r.get("rows", []))
    what = "the card's peak" if on_card else "a CPU read rate: no card, so no % of peak"
    shown = f"{peak:.1f} GB/s" if isinstance(peak, (int, float)) else "unknown"
    lines = [f"Machine: {r.get('machine')}; bandwidth reference ({what}): {shown}.", ""]
    lines += [f"- {note}" for note in r.get("notes", [])]
    lines += [
        "Fused op: the whole call (input checks, launches, the read of its status words); fused kernel: its "
        "launches alone, on inputs prepared once (GB/s and % of peak come from this one).",
        "",
        "| case | torch ms | fused op ms | fused kernel ms | torch / fused op | fused GB/s | % of peak |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r.get("rows", []):
        share = row.get("fast_peak_share")
        lines.append(
            f"| {row.get('case')} | {_num(row.get('torch_ms'), 3)} | {_num(row.get('fast_ms'), 3)} | "
            f"{_num(row.get('kernel_ms'), 3)} | {_num(row.get('ratio'), 1)}x | {_num(row.get('fast_gbps'), 1)} | "
            f"{'-' if share is None else f'{share * 100:.0f}%'} |"
        )
    return lines


def _md_decoder(r: dict) -> list[str]:
    lines = _md_host_syncs(r["host_syncs"]) if "host_syncs" in r else []
    lines += ["### Batched against alone", ""]
    lines += ["Batched answers (8 tokens, greedy, 3 steered) against each request alone, bf16.", ""]
    lines += ["| model | attention | requests | token agreement | identical answers | NaN | error |"]
    lines += ["|---|---|---:|---:|---:|---|---|"]
    for row in r.get("rows", []):
        agreement = row.get("agreement")
        lines.append(
            f"| {row['model']} | {row.get('attention', '-')} | {row.get('requests', 0)} | "
            f"{'-' if agreement is None else f'{agreement:.3f}'} | {row.get('identical', 0)} | "
            f"{'yes' if row.get('nan') else 'no'} | {row.get('error', '')[:120]} |"
        )
    return lines


def _md_host_syncs(s: dict) -> list[str]:
    lines = ["### Host syncs per decoding step", ""]
    if "error" in s:
        return lines + [f"Not measured: {s['error']}", ""]
    lines += [
        f"{s['model']} on {s['device']}: {s['requests']} requests (unsafe, safe, none), {s['tokens']} tokens "
        f"each, {s['steer_steps']} steered; each case runs twice and is counted in the second. Steps: the "
        "decoder's token choices (one per token of the longest answer); decoder reads: its device-to-host "
        "reads (the one read a step is designed to make); CUDA syncs: warnings of "
        '`torch.cuda.set_sync_debug_mode("warn")`, in the step loop (choosing tokens / dropping rows / the '
        "decoding forward) and outside it (setup, prefill, result); syncs / step: the step loop's syncs "
        "over the steps.",
        "",
        "As designed: 1.00 decoder read per step, in the token choice, and no sync in dropping rows; a sync "
        "in the forward can come from transformers itself (its sdpa mask code checks the padding mask on the "
        "host); the places listed below the table say where each one is.",
        "",
    ]
    if s.get("cuda_syncs_reason"):
        lines += [f"CUDA syncs not measured: {s['cuda_syncs_reason']}.", ""]
    lines += ["| recipe | sampling | steps | decoder reads | reads / step | CUDA syncs | "]
    lines[-1] += "choice / drop / forward | outside steps | syncs / step | error |"
    lines += ["|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for c in s.get("cases", []):
        places = c.get("cuda_syncs_by_place")
        split = " / ".join(str(places[name]) for name in STEP_METHODS) if places else "-"
        lines.append(
            f"| {c['recipe']} | {c['sampling']} | {c.get('steps', '-')} | {c.get('decoder_reads', '-')} | "
            f"{_num(c.get('reads_per_step'), 2)} | {'-' if c.get('cuda_syncs') is None else c['cuda_syncs']} | "
            f"{split} | {places['outside'] if places else '-'} | {_num(c.get('cuda_syncs_per_step'), 2)} | "
            f"{c.get('error', '')[:120]} |"
        )
    cases = [c for c in s.get("cases", []) if c.get("sites")]
    if cases:
        lines += ["", f"Where they came from: per case, the first {SYNC_SITES} places, innermost frame first.", ""]
    for c in cases:
        for site in c["sites"][:SYNC_SITES]:
            where = ", ".join(f"{n} in {w}" for w, n in site["where"].items())
            case = f"{c['recipe']}, {c['sampling']}"
            lines.append(f"- {case}: `{site['site']}` x{site['count']} ({where}): {site['stack']}")
        if len(c["sites"]) > SYNC_SITES:
            lines.append(f"- {c['recipe']}, {c['sampling']}: {len(c['sites']) - SYNC_SITES} more (device_check.json)")
    return lines + [""]


def _md_e2e(r: dict) -> list[str]:
    lines = [f"{r.get('model', '')} on {r.get('device', '')} (built in {r.get('build_seconds', '-')} s).", ""]
    lines += ["| case | naive s | two-cache s | fused s | plain s | fused vs naive | fused vs two-cache |"]
    lines += ["|---|---:|---:|---:|---:|---:|---:|"]
    for c in r.get("cases", []):
        s = c["seconds"]
        lines.append(
            f"| {c['case']} | {s['naive']:.3f} | {s['two_cache']:.3f} | {s['fused']:.3f} | {s['plain']:.3f} | "
            f"{c['fused_speedup_vs_naive']:.2f}x | {c['fused_speedup_vs_two_cache']:.2f}x |"
        )
    if r.get("files"):
        lines += ["", "Full report: " + ", ".join(os.path.basename(p) for p in r["files"]) + " (in e2e/)."]
    return lines


def _num(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    sys.exit(main())
