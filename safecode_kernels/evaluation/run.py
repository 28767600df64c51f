"""The generation run of an evaluation: every sample of a benchmark through one decoding method,
appended to ``generations.jsonl`` batch by batch, resumable after a crash or Ctrl-C.

Files in the run folder ``out_dir``:

- ``run.json``: the configuration (see :mod:`.run_config`); a rerun with another one is refused.
- ``generations.jsonl``: one JSON object per sample (see :func:`run_eval`), appended with
  :func:`.store.append` (whole lines, fsynced) after each batch. A rerun skips the ids already
  there, so an interrupted run resumes where it stopped; a line cut short by a crash is dropped
  and its sample generated again.

The answers do not depend on how the samples are batched: each sample's noised image is drawn
from its own generator, seeded from ``seed`` and the sample id, and decoding is greedy. A resumed
run therefore writes the same answers as an uninterrupted one, and so does a run spread over Ray
workers (:mod:`.ray_run`), which shares this module's checks, lock, batch runner and write loop.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import signal
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch

from . import store
from .run_config import (
    GENERATIONS_FILE,
    RUN_FILE,
    ConfigMismatch,
    check_and_write,
    differences,
    read_config,
    versions,
)
from .samples import Sample

METHODS = ("safecode", "base", "vcd")
RECIPES = ("paper", "released")
VERDICTS = ("auto", "unsafe", "safe", "none")

#: Keys of a generations line set by the run; a sample field may not use them.
RECORD_KEYS = (
    "id",
    "benchmark",
    "prompt",
    "image",
    "method",
    "recipe",
    "verdict",
    "caption",
    "response",
    "new_tokens",
    "seconds",
    "error",
    "worker",
)
#: Keys of ``run.json`` that :func:`run_eval` sets from its own arguments (``config`` may not).
OWN_CONFIG_KEYS = (
    "method",
    "recipe",
    "verdict",
    "steer_steps",
    "noise_std",
    "seed",
    "max_new_tokens",
    "batch_size",
    "versions",
    "created",
    "updated",
)


class RunAborted(RuntimeError):
    """Too many samples in a row failed to generate: the cause is not one sample (see the message)."""


class RecipeUnavailable(RuntimeError):
    """``recipe="released"`` with an installed :class:`SafeCoDeDecoder` that has no ``recipe`` argument."""


class RunLocked(RuntimeError):
    """Another process is writing into the same run folder."""


def sample_seed(seed: int, sample: Sample) -> int:
    """The seed of ``sample``'s noised image: a stable hash (CRC-32) of ``seed``, benchmark and id,
    the same in every process and whatever the batch the sample falls in."""
    return zlib.crc32(f"{seed}\0{sample.benchmark}\0{sample.id}".encode())


def run_eval(
    model,
    processor,
    samples: Sequence[Sample],
    out_dir,
    *,
    method: str = "safecode",
    recipe: str = "paper",
    verdict: str = "auto",
    judge=None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    seed: int = 0,
    steer_steps: int = 5,
    noise_std: float = 0.1,
    config: dict | None = None,
    progress: bool = True,
    retry_errors: bool = False,
    max_consecutive_errors: int = 16,
) -> dict:
    """Generate an answer for every sample not yet in ``out_dir/generations.jsonl``; append them.

    Args:
        model, processor: a supported Hugging Face multimodal model and its processor.
        samples: the benchmark's samples (one benchmark, unique ids), in order.
        out_dir: the run folder (created if needed).
        method: ``"safecode"`` (SafeCoDe steering with ``recipe``), ``"base"`` (the same decoder
            with ``steer_steps=0``: plain greedy decoding) or ``"vcd"`` (visual contrastive
            decoding, ``SteeringParams.vcd()``, on the first ``steer_steps`` tokens).
        recipe: ``"paper"`` or ``"released"`` (the authors' released code; needs a decoder with
            a ``recipe`` argument, else :class:`RecipeUnavailable`). Passed only when ``"released"``;
            ``base`` and ``vcd`` take only ``"paper"`` (``ValueError``).
        verdict: ``"auto"`` asks ``judge`` for each sample; ``"unsafe"``, ``"safe"``, ``"none"`` fix
            it. ``base`` and ``vcd`` use no verdict: they take ``"auto"`` or ``"none"`` and record
            ``"none"``.
        judge: with ``verdict="auto"`` and ``method="safecode"``, any object with
            ``judge(images, prompts) -> list[Judgement]`` (see :mod:`safecode_kernels.judges`).
        batch_size: samples per decoder call (and per write).
        max_new_tokens: answer length limit; ``None``: the decoder's (the recipe's) default.
        seed: seeds the noised images (per sample, see :func:`sample_seed`) and the decoder.
        steer_steps, noise_std: the decoder's settings.
        config: what the caller knows of the run, recorded in ``run.json`` (``model``,
            ``benchmark``, ``data``, ``split``, ``limit``, ``judge``, ``device``, ``dtype``...); JSON
            values only, none of :data:`OWN_CONFIG_KEYS`.
        progress: a tqdm bar on stderr (samples/s, ETA) when stderr is a terminal.
        retry_errors: also generate again the samples whose line holds an ``error`` (a new line is
            appended; scoring reads the later one).
        max_consecutive_errors: stop (:class:`RunAborted`) after this many samples in a row failed
            in the judge or the decoder, which points at the model or the settings rather than at
            a sample (0: never). Their lines are written first.

    Each line of ``generations.jsonl``: ``id``, ``benchmark``, the sample's ``fields`` at the top
    level, ``prompt``, ``image``, ``method``, ``recipe``, ``verdict`` (the one used), ``caption``
    (the judge's, else ``null``), ``response``, ``new_tokens``, ``seconds`` (the batch's wall time
    divided among its samples) and ``error`` (``null``, or what failed: an unreadable image, the
    judge on that sample, the decoder on that sample; ``response`` is then ``null``, except for
    a request the decoder ended alone at a bad step, whose answer so far is kept). When a batch
    fails, its samples are tried one by one to find the bad one.

    Ctrl-C (SIGINT, in the main thread) stops after the batch in flight is written; a second
    Ctrl-C raises ``KeyboardInterrupt`` at once (what was written stays valid).

    Returns ``{"out_dir", "total", "already_done", "written", "errors", "saved", "remaining",
    "interrupted", "seconds", "samples_per_second", "workers"}`` (``saved``: samples of ``samples``
    with a line; ``workers``: the distinct Ray workers that wrote lines, 0 here).

    Raises:
        ValueError: bad arguments, duplicate ids, several benchmarks, a sample field named like a
            record key; :class:`~.run_config.ConfigMismatch` for a folder made with another
            configuration; :class:`~.store.CorruptLineError` for a damaged ``generations.jsonl``.
        RecipeUnavailable, RunLocked, RunAborted: see their docs.
        JudgeError: the judge is unreachable or refuses every request (connection, timeout, HTTP
            401/403/404/429/5xx); batches done before are saved.
    """
    samples = list(samples)
    settings = _check_arguments(
        samples, method, recipe, verdict, batch_size, max_new_tokens, seed, steer_steps, max_consecutive_errors, config
    )
    if settings["verdict"] == "auto" and not callable(getattr(judge, "judge", None)):
        raise ValueError(
            "verdict 'auto' needs a judge with judge(images, prompts) (e.g. SelfJudge or OpenAIJudge); "
            "or give a fixed verdict"
        )
    runner = batch_runner(model, processor, settings, judge, noise_std)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out_dir):
        pending = _open_run(
            out_dir, samples, settings, _describe_judge(judge), noise_std, batch_size, config, retry_errors
        )
        batches = (runner.run(pending[first : first + batch_size]) for first in range(0, len(pending), batch_size))
        return _loop(batches, samples, len(pending), out_dir, progress, max_consecutive_errors, settings["method"])


def batch_runner(model, processor, settings: dict, judge=None, noise_std: float = 0.1) -> _BatchRunner:
    """The object whose ``run(batch)`` turns a list of samples into their generations lines: the
    decoder of ``settings`` (what :func:`_check_arguments` returns) on ``model``; ``judge`` is asked
    with ``verdict="auto"``. :func:`run_eval` and each Ray worker (:mod:`.ray_run`) use it."""
    decoder = _make_decoder(
        model, processor, settings["method"], settings["recipe"], settings["steer_steps"], noise_std, settings["seed"]
    )
    return _BatchRunner(decoder, settings, judge, settings["seed"], noise_std, settings["max_new_tokens"])


def _open_run(out_dir: Path, samples, settings, judge_name, noise_std, batch_size, config, retry_errors) -> list:
    """With the folder locked: check ``run.json`` against this configuration and write it, then
    return the samples not yet in ``generations.jsonl``, in order."""
    lines = store.read_lines(out_dir / GENERATIONS_FILE)
    full = _full_config(samples, settings, judge_name, noise_std, batch_size, config)
    check_and_write(out_dir, full, has_generations=bool(lines))
    done = _done_ids(lines, retry_errors)
    return [s for s in samples if s.id not in done]


def check_resume(
    out_dir,
    samples: Sequence[Sample],
    *,
    method: str = "safecode",
    recipe: str = "paper",
    verdict: str = "auto",
    judge=None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    seed: int = 0,
    steer_steps: int = 5,
    noise_std: float = 0.1,
    config: dict | None = None,
    retry_errors: bool = False,
) -> int:
    """Check, writing nothing, that :func:`run_eval` with these arguments may write into ``out_dir``
    (before an expensive model load); returns how many of ``samples`` are already done there.

    Raises what :func:`run_eval` raises for its arguments (no judge is needed here), the folder's
    configuration (:class:`~.run_config.ConfigMismatch`), a damaged ``generations.jsonl`` or an
    unavailable recipe.
    """
    samples = list(samples)
    settings = _check_arguments(
        samples, method, recipe, verdict, batch_size, max_new_tokens, seed, steer_steps, 0, config
    )
    check_recipe(recipe)
    out_dir = Path(out_dir)
    lines = store.read_lines(out_dir / GENERATIONS_FILE)
    recorded = read_config(out_dir)
    if recorded is not None:
        current = json.loads(
            json.dumps(_full_config(samples, settings, _describe_judge(judge), noise_std, batch_size, config))
        )
        diff = differences(recorded, current)
        if diff:
            raise ConfigMismatch(out_dir / RUN_FILE, diff)
    elif lines:
        raise ValueError(
            f"{out_dir / GENERATIONS_FILE} exists but {out_dir / RUN_FILE} does not, so its "
            "configuration is unknown: restore run.json or give another folder"
        )
    done = _done_ids(lines, retry_errors)
    return sum(s.id in done for s in samples)


def _full_config(samples, settings, judge_name, noise_std, batch_size, config) -> dict:
    """What ``run.json`` records: the caller's ``config`` and the run's own settings (``judge_name``:
    what to record as the judge when ``config`` names none)."""
    full = {**(config or {}), **settings, "noise_std": noise_std, "batch_size": batch_size, "versions": versions()}
    full.setdefault("benchmark", samples[0].benchmark if samples else None)
    if settings["verdict"] != "auto":
        full["judge"] = None  # no judge is asked
    elif full.get("judge") is None:
        full["judge"] = judge_name
    return full


def _done_ids(lines: list[dict], retry_errors: bool) -> set[str]:
    return {str(r.get("id")) for r in lines if not (retry_errors and r.get("error"))}


# ----- the loop -------------------------------------------------------------------------------
def _loop(batches, samples, pending: int, out_dir: Path, progress, max_consecutive_errors, method: str) -> dict:
    """Append each list of lines that ``batches`` yields to ``generations.jsonl`` (one synced write
    per batch), counting errors and stopping at Ctrl-C; ``pending``: how many samples it will
    yield. Returns the summary of :func:`run_eval`, with ``workers``: the distinct ``worker`` values
    of the lines written (0 when the lines have none)."""
    from tqdm.auto import tqdm

    path = out_dir / GENERATIONS_FILE
    already = len(samples) - pending
    start = time.perf_counter()
    written = errors = consecutive = 0
    workers = set()
    bar = tqdm(
        total=len(samples),
        initial=already,
        unit="sample",
        file=sys.stderr,
        disable=None if progress else True,  # None: tqdm shows the bar on a terminal only
        dynamic_ncols=True,
        desc=f"eval {samples[0].benchmark if samples else ''} ({method})",
    )
    interrupt = _Interrupt()
    try:
        with interrupt, contextlib.closing(batches):  # a generator: closing it stops the work behind it
            for records in batches:
                store.append(path, records)
                written += len(records)
                for record in records:
                    if record.get("worker") is not None:
                        workers.add(json.dumps(record["worker"], sort_keys=True))
                    if record["error"] is None:
                        consecutive = 0
                    else:
                        errors += 1
                        # An unreadable image is the data's fault; judge or decoder failures in a row are not.
                        consecutive += not record["error"].startswith("image:")
                bar.update(len(records))
                bar.set_postfix(errors=errors, refresh=False)
                if max_consecutive_errors and consecutive >= max_consecutive_errors:
                    raise RunAborted(
                        f"{consecutive} samples in a row failed to generate (last: {records[-1]['error']}): "
                        f"the model or the settings are at fault, not one sample; their lines are in {path}: "
                        "fix the cause, then rerun with --retry-errors (retry_errors=True)"
                    )
                if interrupt.requested:
                    break
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    saved = already + written
    return {
        "out_dir": str(out_dir),
        "total": len(samples),
        "already_done": already,
        "written": written,
        "errors": errors,
        "saved": saved,
        "remaining": len(samples) - saved,
        "interrupted": interrupt.requested and saved < len(samples),
        "seconds": elapsed,
        "samples_per_second": written / elapsed if elapsed > 0 else None,
        "workers": len(workers),
    }


class _BatchRunner:
    """Turns one batch of samples into its generations lines, isolating the samples that fail."""

    def __init__(self, decoder, settings: dict, judge, seed: int, noise_std: float, max_new_tokens):
        self.decoder, self.judge, self.seed, self.noise_std = decoder, judge, seed, noise_std
        self.method, self.recipe = settings["method"], settings["recipe"]
        self.verdict, self.steer_steps = settings["verdict"], settings["steer_steps"]
        self.generate_kwargs = {"do_sample": False}
        if max_new_tokens is not None:  # None: the decoder's (recipe's) default
            self.generate_kwargs["max_new_tokens"] = max_new_tokens

    def run(self, batch: list[Sample]) -> list[dict]:
        start = time.perf_counter()
        errors, images, noised = {}, {}, {}
        for sample in batch:
            try:
                images[sample.id] = sample.load_image()
                if self.steer_steps > 0:
                    generator = torch.Generator().manual_seed(sample_seed(self.seed, sample))
                    noised[sample.id] = _noised(images[sample.id], self.noise_std, generator)
            except Exception as err:  # noqa: BLE001 - any unreadable image is that sample's error
                errors[sample.id] = _error("image", err)
        ok = [s for s in batch if s.id not in errors]
        judgements = self._judge(ok, images, errors)
        ok = [s for s in ok if s.id not in errors]
        results = self._generate(ok, images, noised, judgements, errors)
        seconds = (time.perf_counter() - start) / len(batch)
        return [self._record(s, judgements.get(s.id), results.get(s.id), errors.get(s.id), seconds) for s in batch]

    # -- the judge --
    def _judge(self, batch, images, errors) -> dict:
        """``id -> (verdict name, caption)``; failing samples go to ``errors``."""
        if self.verdict != "auto":
            return {s.id: (self.verdict, None) for s in batch}
        out = {}

        def attempt(group):
            judgements = self.judge.judge([images[s.id] for s in group], [s.prompt for s in group])
            if len(judgements) != len(group):
                raise _JudgeProtocolError(f"the judge gave {len(judgements)} judgements for {len(group)} requests")
            for sample, judgement in zip(group, judgements, strict=True):
                out[sample.id] = (judgement.verdict.name.lower(), judgement.caption)

        _whole_or_each(
            batch, attempt, lambda s, err: errors.__setitem__(s.id, _error("judge", err)), fatal=_judge_is_down
        )
        return out

    # -- the decoder --
    def _generate(self, batch, images, noised, judgements, errors) -> dict:
        """``id -> (text, new tokens)``; failing samples go to ``errors``."""
        out = {}

        def attempt(group):
            kwargs = dict(self.generate_kwargs)
            if self.steer_steps > 0:
                kwargs["noised_images"] = [noised[s.id] for s in group]
            result = self.decoder.generate(
                [images[s.id] for s in group], [s.prompt for s in group], [judgements[s.id][0] for s in group], **kwargs
            )
            for k, sample in enumerate(group):
                out[sample.id] = (result.texts[k], len(result.sequences[k]))
                if result.errors[k]:  # ended alone (bad logits): the answer so far, and why
                    errors[sample.id] = f"generate: {result.errors[k]}"

        _whole_or_each(batch, attempt, lambda s, err: errors.__setitem__(s.id, _error("generate", err)))
        return out

    def _record(self, sample: Sample, judgement, result, error, seconds) -> dict:
        verdict, caption = (
            judgement if judgement is not None else (self.verdict if self.verdict != "auto" else None, None)
        )
        response, new_tokens = result if result is not None else (None, None)
        return {
            "id": sample.id,
            "benchmark": sample.benchmark,
            **sample.fields,
            "prompt": sample.prompt,
            "image": sample.image,
            "method": self.method,
            "recipe": self.recipe,
            "verdict": verdict,
            "caption": caption,
            "response": response,
            "new_tokens": new_tokens,
            "seconds": seconds,
            "error": error,
        }


class _JudgeProtocolError(RuntimeError):
    """A judge that breaks its contract (a wrong number of judgements): a bug, not a sample's fault."""


def _whole_or_each(batch: list, attempt, on_error, fatal=lambda err: False) -> None:
    """``attempt(batch)``; if it raises, ``attempt([sample])`` for each sample, reporting the
    failures with ``on_error(sample, err)``. An error for which ``fatal(err)`` holds is raised."""
    if not batch:
        return
    try:
        attempt(batch)
        return
    except Exception as err:  # noqa: BLE001 - NaN logits (StepError), OOM, a bad answer: find the sample
        if isinstance(err, _JudgeProtocolError) or fatal(err):
            raise
        if len(batch) == 1:
            on_error(batch[0], err)
            return
    for sample in batch:
        try:
            attempt([sample])
        except Exception as err:  # noqa: BLE001
            if isinstance(err, _JudgeProtocolError) or fatal(err):
                raise
            on_error(sample, err)


def _error(stage: str, err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{stage}: {type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def _noised(image, std, generator):
    from ..decoding.noise import make_noised_image

    return make_noised_image(image, std, generator=generator)


def _judge_is_down(err: BaseException) -> bool:
    """Whether a judge error is about the judge (unreachable, misconfigured, overloaded) rather
    than about one request: the run stops instead of marking every sample failed."""
    from ..judges import JudgeConnectionError, JudgeError, JudgeHTTPError, JudgeResponseError, UnparseableVerdict

    if isinstance(err, JudgeHTTPError):
        return err.status in (401, 403, 404, 429) or err.status >= 500
    if isinstance(err, JudgeConnectionError):
        return True
    if isinstance(err, (UnparseableVerdict, JudgeResponseError)):
        return False
    return isinstance(err, JudgeError)  # timeouts, a missing API key...


# ----- setup --------------------------------------------------------------------------------
def _check_arguments(
    samples, method, recipe, verdict, batch_size, max_new_tokens, seed, steer_steps, max_consecutive_errors, config
) -> dict:
    """Validate the arguments; returns the settings recorded in ``run.json``."""
    for name, value, choices in (
        ("method", method, METHODS),
        ("recipe", recipe, RECIPES),
        ("verdict", verdict, VERDICTS),
    ):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("steer_steps", steer_steps, 0),
        ("seed", seed, None),
        ("max_consecutive_errors", max_consecutive_errors, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            raise ValueError(f"{name} must be an int{f' >= {low}' if low is not None else ''}, got {value!r}")
    if max_new_tokens is not None and (
        isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be None (the recipe's default) or an int >= 1, got {max_new_tokens!r}")
    if method != "safecode":
        if recipe != "paper":  # the released recipe replaces the steering: vcd would silently be SafeCoDe
            raise ValueError(f"method {method!r} uses no recipe: give recipe 'paper', not {recipe!r}")
        if verdict not in ("auto", "none"):
            raise ValueError(f"method {method!r} uses no verdict: give verdict 'none' (or 'auto'), not {verdict!r}")
        verdict = "none"
    if config is not None:
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        taken = [k for k in OWN_CONFIG_KEYS if k in config]  # run_eval records these from its arguments
        if taken:
            raise ValueError(f"config may not set {', '.join(taken)}: run_eval records them from its arguments")
    _check_samples(samples)
    return {
        "method": method,
        "recipe": recipe,
        "verdict": verdict,
        "steer_steps": 0 if method == "base" else steer_steps,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
    }


def _check_samples(samples) -> None:
    seen, benchmark = set(), None
    for k, sample in enumerate(samples):
        if not isinstance(sample, Sample):
            raise TypeError(f"samples[{k}] must be a Sample, got {type(sample).__name__}")
        if sample.id in seen:
            raise ValueError(f"duplicate sample id {sample.id!r} (samples[{k}]): ids must be unique")
        seen.add(sample.id)
        if benchmark is None:
            benchmark = sample.benchmark
        elif sample.benchmark != benchmark:
            raise ValueError(
                f"samples[{k}] ({sample.id!r}) is from {sample.benchmark!r}, the first from "
                f"{benchmark!r}: run each benchmark into its own folder"
            )
        clash = sorted(set(sample.fields) & set(RECORD_KEYS))
        if clash:
            raise ValueError(
                f"sample {sample.id!r} has field(s) {', '.join(clash)} named like keys of the generations line"
            )


def _make_decoder(model, processor, method, recipe, steer_steps, noise_std, seed):
    from ..decoding import SafeCoDeDecoder
    from ..params import SteeringParams

    kwargs = {"steer_steps": steer_steps, "noise_std": noise_std, "seed": seed}
    if method == "vcd":
        kwargs["params"] = SteeringParams.vcd()
    if recipe != "paper":  # passed only when asked for, so that older decoders run the paper's recipe
        check_recipe(recipe)
        kwargs["recipe"] = recipe
    return SafeCoDeDecoder(model, processor, **kwargs)


def check_recipe(recipe: str) -> None:
    """:class:`RecipeUnavailable` when ``recipe`` is not ``"paper"`` and the installed
    :class:`SafeCoDeDecoder` takes no ``recipe`` argument."""
    from ..decoding import SafeCoDeDecoder

    if recipe != "paper" and "recipe" not in inspect.signature(SafeCoDeDecoder).parameters:
        raise RecipeUnavailable(
            f"recipe {recipe!r} needs a SafeCoDeDecoder with a recipe argument; the installed "
            "safecode_kernels has none (update it, or use recipe 'paper')"
        )


def _describe_judge(judge) -> str | None:
    if judge is None:
        return None
    model = getattr(judge, "model", None)
    return f"{type(judge).__name__}({model})" if isinstance(model, str) else type(judge).__name__


# ----- folder lock and Ctrl-C -----------------------------------------------------------------
@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Hold an exclusive advisory lock on the folder itself (no lock file), released at exit or death.
    Where the file system has no such locks (Windows, some network mounts), nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(f"another run is writing into {folder}: wait for it or give another folder") from None
        except OSError:
            pass  # no locks here (ENOLCK, EINVAL): run unprotected, as without fcntl
        yield
    finally:
        os.close(fd)  # closing releases the lock


class _Interrupt:
    """Within ``with``: the first SIGINT sets :attr:`requested` (the loop stops after the batch in
    flight is written); a second raises ``KeyboardInterrupt``. Outside the main thread nothing is
    installed. The previous handler is restored at exit."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nCtrl-C: stopping once the batch in flight is saved (Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __exit__(self, *exc):
        if self._installed:
            previous = self._previous if self._previous is not None else signal.SIG_DFL
            signal.signal(signal.SIGINT, previous)
        return False


__all__ = [
    "METHODS",
    "RECIPES",
    "RECORD_KEYS",
    "VERDICTS",
    "RecipeUnavailable",
    "RunAborted",
    "RunLocked",
    "check_recipe",
    "check_resume",
    "run_eval",
    "sample_seed",
]
