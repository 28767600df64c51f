"""The ``safecode-kernels`` command line (also ``python -m safecode_kernels``).

Subcommands:

- ``demo``: the naive loop and the fused decoder on a tiny random LLaVA built in code (``--toy``:
  a toy model nudged in code, on which the verdict visibly decides whether the answer refuses);
- ``generate``: one request on a real model from a local folder (or the hub, where reachable);
- ``bench``: the benchmarks (``safecode_kernels.app.benchmarking``), its arguments passed through;
- ``info``: versions, and which backends of the step op work here;
- ``eval``, ``score``, ``report``: benchmark runs, their scoring and side-by-side reports
  (``safecode_kernels.app.eval_cli``).

Exit status: 0 success; 1 a failure while running (model loading, decoding, the demo's
decoders disagreeing); 2 bad input (arguments, including every value the Python API would
reject and a backend that cannot run here, a missing or unreadable image, a model folder that
does not exist or a bare name that is no hub id ``owner/name``, an unsupported architecture);
3 the judge failed (unreachable server, HTTP error, malformed answer).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time


class CLIError(Exception):
    """An error the command line reports in one line, with an exit status."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """``argparse`` with a short usage error: the error in one line and where the options are
    listed, instead of the whole usage block first (exit status 2, as argparse)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} --help` lists the options)\n")


def choice(text: str) -> str:
    """A choice as typed, matched case-insensitively (``UNSAFE`` is ``unsafe``, as ``Verdict.parse`` takes it)."""
    return text.strip().lower()


# ----- demo -----------------------------------------------------------------------------------
def _cmd_demo(args) -> int:
    from .demo import REQUESTS
    from .demo import main as demo_main

    for flag, value, low, high in (
        ("--requests", args.requests, 1, len(REQUESTS)),
        ("--max-new-tokens", args.max_new_tokens, 1, None),
        ("--steer-steps", args.steer_steps, 0, None),
        ("--threads", args.threads, 0, None),
    ):
        if value < low or (high is not None and value > high):
            raise CLIError(f"{flag} must be {f'in [{low}, {high}]' if high else f'>= {low}'}, got {value}")
    if args.toy:
        return _cmd_toy(args)

    return demo_main(
        num_requests=args.requests,
        max_new_tokens=args.max_new_tokens,
        steer_steps=args.steer_steps,
        seed=args.seed,
        backend=args.backend,
        threads=args.threads or None,
        as_json=args.json,
        progress=False if args.no_progress else None,
    )


def _cmd_toy(args) -> int:
    import dataclasses

    import torch

    from .toy import format_toy, run_toy

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        answers = run_toy(seed=args.seed, backend=args.backend)
    finally:
        torch.set_num_threads(threads)
    if args.json:
        print(json.dumps({"toy": True, "answers": [dataclasses.asdict(a) for a in answers]}, indent=2))
    else:
        print(format_toy(answers))
    return 0


# ----- info -----------------------------------------------------------------------------------
def _cmd_info(args) -> int:
    from .info import collect, format_info

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


# ----- bench ----------------------------------------------------------------------------------
def bench_entry_point():
    """The benchmark's ``main(argv, prog) -> int``: ``safecode_kernels.app.benchmarking.main`` if the
    package defines one, else ``safecode_kernels.app.benchmarking.decode.main``; ``None`` if
    neither is installed."""
    import importlib

    for module_name in ("safecode_kernels.app.benchmarking", "safecode_kernels.app.benchmarking.decode"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and module_name.startswith(err.name):
                continue  # the module itself is missing (not one of its imports)
            raise
        main = getattr(module, "main", None)
        if callable(main):
            return main
    return None


def _cmd_bench(args) -> int:
    main = bench_entry_point()
    if main is None:
        raise CLIError(
            "the benchmarks are not part of this installation (safecode_kernels.app.benchmarking has no "
            "main); from a source checkout: python benchmarks/bench_step.py",
            code=1,
        )
    try:
        result = main(list(args.bench_args), prog="safecode-kernels bench")
    except SystemExit as exit_:  # its --help, or a usage error (already printed)
        return 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
    return int(result or 0)


# ----- generate -------------------------------------------------------------------------------
def load_image(path: str):
    """The image at ``path`` as RGB; :class:`CLIError` when missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise CLIError(f"image file not found: {path}")
    if os.path.isdir(path):
        raise CLIError(f"--image must be an image file, got a directory: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise CLIError(f"cannot read image {path}: not an image format Pillow can open") from None
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot read image {path}: {err}") from None


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is meant as a path: it cannot be a hub id (``owner/name``), or its
    first part is a folder here (``models/llava`` with a ``models/`` folder: a mistyped path,
    which the hub would otherwise be asked for, with retries when offline)."""
    return (
        name.startswith(("/", "./", "../", "~", ".\\"))
        or name in (".", "..")
        or os.sep + os.sep in name
        or name.count("/") > 1
        or ("/" in name and os.path.isdir(name.split("/")[0]))
    )


def resolve_model(name: str) -> str:
    """A local folder (checked), or a hub id (``owner/name``) passed on as is. Raises
    :class:`CLIError` (exit 2) for a folder without ``config.json``, a file, or a name that is
    neither a folder here nor shaped as a hub id (a bare ``nope`` would cost the hub's retries
    offline)."""
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CLIError(
                f"model folder {name} has no config.json: give a folder written by save_pretrained "
                "(or downloaded from the hub)"
            )
        return path
    if os.path.exists(path):
        raise CLIError(f"--model must be a model folder (or a hub id), got a file: {name}")
    if _looks_like_path(name):
        hint = ""
        if name.count("/") == 1 and not name.startswith(("/", "./", "../", "~")):
            hint = f" (read as a path because ./{name.split('/')[0]} is a folder here; for the hub id, run elsewhere)"
        raise CLIError(f"model folder not found: {name}{hint}")
    if "/" not in name:  # every supported family's hub id is owner/name: asking the hub is futile
        raise CLIError(f"model folder not found: {name} (no such folder here; a hub model id is written owner/name)")
    return name


def _offline_note() -> str:
    value = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return " (HF_HUB_OFFLINE is set: only local folders and models already in the cache load)"
    return ""


def hub_options(model_name: str) -> dict:
    """``from_pretrained``'s options for ``model_name``: an existing folder loads with
    ``local_files_only=True``, so that nothing asks the hub (an offline machine would otherwise
    spend its retries there before reading the folder)."""
    return {"local_files_only": True} if os.path.isdir(model_name) else {}


def check_architecture(model_name: str):
    """The model's config; :class:`CLIError` when its architecture has no adapter."""
    from transformers import AutoConfig

    from ..decoding.adapters import ADAPTERS, supported_models

    try:
        config = AutoConfig.from_pretrained(model_name, **hub_options(model_name))
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load the config of {model_name}: {_first_line(err)}{_offline_note()}") from None
    model_type = getattr(config, "model_type", None)
    if not any(model_type in adapter.model_types for adapter in ADAPTERS):
        architectures = ", ".join(getattr(config, "architectures", None) or []) or "unknown architecture"
        raise CLIError(
            f"unsupported architecture: {model_name} is {architectures} (model_type {model_type!r}); "
            f"supported: {', '.join(supported_models())}"
        )
    return config


def load_model(model_name: str, dtype: str, device: str):
    """``(model, processor)`` from a folder or hub id, in eval mode on ``device``."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    try:
        processor = AutoProcessor.from_pretrained(model_name, **hub_options(model_name))
    except ImportError as err:  # e.g. Qwen's video processor needs torchvision
        raise CLIError(f"cannot load the processor of {model_name}: {_first_line(err)}", code=1) from None
    except (OSError, ValueError, KeyError) as err:  # an incomplete local folder is bad input
        raise CLIError(
            f"cannot load the processor of {model_name}: {_first_line(err)}{_offline_note()}",
            code=2 if os.path.isdir(model_name) else 1,
        ) from None
    if getattr(processor, "image_processor", None) is None:
        raise CLIError(
            f"{model_name} has no image processor (AutoProcessor gave a {type(processor).__name__}): "
            "save the whole processor there with processor.save_pretrained(folder)"
        )
    # With accelerate installed the weights load straight onto an accelerator; without it
    # (transformers needs it for device_map) they load on the CPU and are moved below.
    placement = {"device_map": device} if device != "cpu" and importlib.util.find_spec("accelerate") else {}
    if device != "cpu" and not placement:
        print(
            f"note: loading {model_name} into CPU memory first, then onto {device}; "
            "`pip install accelerate` loads it straight onto the device",
            file=sys.stderr,
        )
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            model_name, dtype=torch_dtype, **placement, **hub_options(model_name)
        )
    except ImportError as err:
        raise CLIError(f"cannot load {model_name}: {_first_line(err)}", code=1) from None
    except (OSError, ValueError, KeyError) as err:
        raise CLIError(f"cannot load {model_name}: {_first_line(err)}{_offline_note()}", code=1) from None
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as err:
        raise CLIError(f"cannot put {model_name} on {device}: {_first_line(err)}", code=1) from None
    return model.eval(), processor


def resolve_device(name: str, local: bool = True) -> str:
    """``--device`` checked before anything loads: ``auto`` (CUDA if available), or a device
    torch knows (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...) that this machine has when the
    model runs here (``local``). Raises :class:`CLIError` (exit 2) naming the problem."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a device: use cpu, cuda, cuda:1, ... or auto") from None
    if local and device.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(f"--device {name}: no CUDA device is available here (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


def check_backend(backend: str, device: str | None = None) -> None:
    """``--backend`` checked before the model loads: a backend named explicitly must run here
    (``backend_status``), and on ``device`` when given (the C++ backend takes CPU tensors only;
    Triton CUDA tensors, or CPU tensors in its interpreter). ``auto`` always runs. Raises
    :class:`CLIError` (exit 2) with the reason."""
    if backend == "auto":
        return
    from ..ops import dispatch

    reason = dispatch.backend_status().get(backend)
    if reason is None and device is not None:
        import torch

        if backend == "cpu" and torch.device(device).type != "cpu":
            reason = f"it takes CPU tensors, and the model runs on {device}"
        elif backend == "triton":
            from ..ops import step_triton

            reason = step_triton.unavailable_reason(device)
    if reason is not None:
        raise CLIError(f"--backend {backend} cannot run here: {reason} (--backend auto picks one that can)")


def _finite(value: float):
    """JSON has no NaN: a refusal mass that was not computed (a forced token) is null."""
    return None if value != value else value


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def make_judge(args, model=None, processor=None):
    from ..judges import FixedJudge, OpenAIJudge, SelfJudge

    if args.verdict != "auto":
        return FixedJudge(args.verdict)
    if args.judge == "self":
        return SelfJudge(
            model, processor, on_unparseable=args.on_unparseable, backend=args.backend, flow=args.judge_flow
        )
    try:
        judge = OpenAIJudge(
            args.judge_url,
            args.judge_model,
            api_key_env=args.judge_key_env,
            timeout=args.judge_timeout,
            max_retries=args.judge_retries,
            on_unparseable=args.on_unparseable,
            flow=args.judge_flow,
        )
    except ValueError as err:
        raise CLIError(f"--judge openai: {err}") from None
    problem = judge.missing_key()
    if problem is not None:  # bad input, found before the model loads or any request is sent
        raise CLIError(f"--judge openai: {problem}")
    return judge


def _check_generate_args(args):
    """Check every option before any file is read; return the :class:`SteeringParams` they give.

    The values go through the checks the Python API itself runs (``SteeringParams``, the
    decoder's), whatever other options are given, so that both accept the same values; their
    ``ValueError`` / ``TypeError`` become a one-line error naming the option (exit status 2).
    """
    if args.judge is None:
        args.judge = "fixed" if args.verdict != "auto" else "self"
    if args.judge == "fixed" and args.verdict == "auto":
        raise CLIError("--judge fixed needs a verdict: --verdict safe, unsafe or none")
    if args.judge != "fixed" and args.verdict != "auto":
        raise CLIError(
            f"--verdict {args.verdict} fixes the verdict, so --judge {args.judge} would not be asked: "
            "give one or the other"
        )
    if args.judge == "fixed" and args.judge_flow != "one-call":
        raise CLIError(f"--judge-flow {args.judge_flow} goes with --judge self or openai, not a fixed verdict")
    if not args.prompt.strip():  # the API takes any text; on the command line this is a quoting slip
        raise CLIError(f"--prompt is empty ({args.prompt!r}): give the request's text")
    check_decoder_args(
        steer_steps=args.steer_steps,
        noise_std=args.noise_std,
        max_new_tokens=args.max_new_tokens,
        max_new_tokens_unsafe=args.max_new_tokens_unsafe,
    )
    check_judge_args(args)
    check_backend(args.backend)
    params = _steering_params(args)
    _recipe(args)  # the released recipe checks its alpha
    return params


def check_judge_args(args) -> None:
    """``--judge-retries`` and ``--judge-timeout``, as the judges check them."""
    if args.judge_retries < 0:
        raise CLIError(f"--judge-retries must be >= 0, got {args.judge_retries}")
    if not (math.isfinite(args.judge_timeout) and args.judge_timeout > 0):
        raise CLIError(f"--judge-timeout must be a finite number of seconds > 0, got {args.judge_timeout}")


#: The option of each argument name that the Python API's errors start with.
OPTIONS = {
    "alpha": "--alpha",
    "alpha_safe": "--alpha-safe",
    "sensitive_top_k": "--sensitive-top-k",
    "boost": "--boost",
    "suppress": "--suppress",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "steer_steps": "--steer-steps",
    "noise std": "--noise-std",
    "max_new_tokens": "--max-new-tokens",
    "max_new_tokens_unsafe": "--max-new-tokens-unsafe",
}


def option_error(err: Exception) -> CLIError:
    """The API's ``ValueError`` / ``TypeError`` as a :class:`CLIError` naming the option
    (``temperature must be >= 0.0, got -1.0`` becomes ``--temperature must be >= 0.0, got -1.0``)."""
    message = _first_line(err)
    for name in sorted(OPTIONS, key=len, reverse=True):
        if message.startswith(name + " "):
            return CLIError(OPTIONS[name] + message[len(name) :])
    return CLIError(message)


def check_decoder_args(*, steer_steps=None, noise_std=None, max_new_tokens=None, max_new_tokens_unsafe=None) -> None:
    """The decoder's own checks of the options that become its arguments (``None``: not given)."""
    from ..decoding.noise import check_noise_std
    from ..validation import check_int

    try:
        if steer_steps is not None:
            check_int("steer_steps", steer_steps, 0)
        if noise_std is not None:
            check_noise_std(noise_std)
        for name, value in (("max_new_tokens", max_new_tokens), ("max_new_tokens_unsafe", max_new_tokens_unsafe)):
            if value is not None:
                check_int(name, value, 1)
    except (TypeError, ValueError) as err:
        raise option_error(err) from None


#: The paper recipe's options that the released recipe does not use (its alpha for safe
#: verdicts is its own: alpha * safe_alpha_factor).
PAPER_ONLY = ("alpha_safe", "sensitive_top_k", "boost", "suppress")


def _steering_params(args):
    """The options' ``SteeringParams``. The sampling options are checked here as well, whether
    or not the run samples (the decoder takes them as ``generate``'s arguments: :func:`_sampling`)."""
    from ..params import SteeringParams

    fields = dict(
        alpha=args.alpha,
        temperature=0.0 if args.temperature is None else args.temperature,
        top_p=1.0 if args.top_p is None else args.top_p,
    )
    # Unset (None): the paper recipe's defaults; set with the released recipe: an error.
    given = {name: getattr(args, name) for name in PAPER_ONLY if getattr(args, name) is not None}
    if given and args.recipe == "released":
        options = ", ".join(OPTIONS[name] for name in given)
        raise CLIError(
            f"{options} {'does' if len(given) == 1 else 'do'} not apply with --recipe released "
            "(it scales refusal probabilities and forces a refusal phrase instead): leave "
            f"{'it' if len(given) == 1 else 'them'} out, or use --recipe paper"
        )
    fields.update(given)
    try:
        return SteeringParams(**fields).replace(temperature=0.0, top_p=1.0)
    except (TypeError, ValueError) as err:
        raise option_error(err) from None


def _recipe(args):
    """The decoder's ``recipe=``: "paper", or the released code's with the given alpha."""
    if args.recipe == "paper":
        return "paper"
    from ..recipes import ReleasedRecipe

    try:
        return ReleasedRecipe(alpha=args.alpha)
    except (TypeError, ValueError) as err:
        raise option_error(err) from None


def _sampling(args) -> dict:
    """``generate``'s sampling arguments: ``--temperature`` unset leaves them to the recipe
    (greedy for the paper's, the released code's per-verdict values for the released one;
    ``--top-p`` given replaces the recipe's top-p)."""
    if args.temperature is None:
        return dict(do_sample=None if args.recipe == "released" else False, top_p=args.top_p)
    top_p = 1.0 if args.top_p is None else args.top_p
    return dict(do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_p=top_p)


def is_greedy(args) -> bool:
    """Whether every step takes the most probable token: ``--temperature 0``, or unset under
    the paper recipe (the released recipe samples by default)."""
    return args.temperature == 0 or (args.temperature is None and args.recipe == "paper")


def released_sampling(args, verdict: str) -> dict:
    """The sampling the released recipe used for a request with ``verdict``: ``temperature``
    and ``top_p`` of the unsteered steps (the recipe's per-verdict continuation values unless
    ``--temperature`` / ``--top-p`` replace them; greedy: ``0.0`` and ``None``), and
    ``steered_temperature``, that of the steered steps after the first (a safe verdict's path
    with two or more steered steps; ``None`` where no steered step samples: an unsafe verdict
    forces a refusal phrase, ``none`` is not steered)."""
    recipe = _recipe(args)
    if is_greedy(args):
        return {"temperature": 0.0, "top_p": None, "steered_temperature": None}
    temperature, top_p = recipe.continuation_safe if verdict == "safe" else recipe.continuation_other
    if args.temperature is not None:  # as _sampling: the caller's temperature, top-p 1 unless given
        temperature, top_p = args.temperature, 1.0
    if args.top_p is not None:
        top_p = args.top_p
    steered = recipe.safe_temperature if verdict == "safe" and args.steer_steps >= 2 else None
    return {"temperature": temperature, "top_p": top_p, "steered_temperature": steered}


def settings_record(args, params, verdict: str, device: str) -> dict:
    """The ``settings`` object of ``generate --json``: the options that applied. The paper
    recipe lists its steering parameters; the released recipe its alpha and the sampling it
    used for this verdict (:func:`released_sampling`), not the paper's parameters."""
    record = {"recipe": args.recipe, "steer_steps": args.steer_steps, "alpha": params.alpha}
    if args.recipe == "paper":
        record.update({name: getattr(params, name) for name in PAPER_ONLY})
        sampling = {"temperature": args.temperature}
    else:
        sampling = released_sampling(args, verdict)
    record.update(noise_std=args.noise_std, seed=args.seed, max_new_tokens=args.max_new_tokens)
    return {**record, **sampling, "device": device, "backend": args.backend}


def settings_line(args, params, verdict: str) -> str:
    """The text output's ``settings:`` line: the recipe, its alpha, and how the answer was sampled."""
    if args.recipe == "paper":
        alpha = f"alpha {params.alpha:g} (safe verdicts {params.alpha_safe:g})"
        if is_greedy(args):
            how = "greedy"
        else:
            how = f"sampled at temperature {args.temperature:g}, top-p {1.0 if args.top_p is None else args.top_p:g}"
        return f"settings: paper recipe, {alpha}, {how}"
    sampling = released_sampling(args, verdict)
    if sampling["top_p"] is None:
        how = "greedy (--temperature 0)"
    else:
        source = "the recipe's" if args.temperature is None and args.top_p is None else "given"
        how = f"sampled at temperature {sampling['temperature']:g}, top-p {sampling['top_p']:g} ({source})"
        if sampling["steered_temperature"] is not None:
            how += f"; steered steps after the first at temperature {sampling['steered_temperature']:g}"
    return f"settings: released recipe, alpha {params.alpha:g}, {how}"


def judge_record(kind: str, judgement) -> dict:
    """The ``judge`` object of ``generate --json``: ``kind`` and the :class:`Judgement`'s fields.
    ``parsed`` says whether the verdict was read from the judge's answer (``false``: the
    ``--on-unparseable`` policy gave it); with a fixed verdict no judge answered, so
    ``raw_answer`` and ``parsed`` are ``null``."""
    record = {"kind": kind, **judgement.to_dict()}
    if kind == "fixed":
        record.update(raw_answer=None, parsed=None)
    return record


def _cmd_generate(args) -> int:
    from tqdm.auto import tqdm

    from ..decoding import SafeCoDeDecoder
    from ..judges import JudgeError
    from ..ops.step_inputs import StepError

    params = _check_generate_args(args)
    if args.top_p is not None and is_greedy(args):  # accepted (checked above), but nothing samples
        print("note: --top-p applies to sampling (--temperature > 0); this run is greedy", file=sys.stderr)
    if args.no_progress or not sys.stderr.isatty():  # bars only on a terminal, never in a log file
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' own bars (loading weights)
    image = load_image(args.image)
    model_name = resolve_model(args.model)
    check_architecture(model_name)
    device = resolve_device(args.device)
    check_backend(args.backend, device)

    stages = ["load model", "judge", "generate"]
    if args.judge != "self":
        stages = ["judge", "load model", "generate"]  # a failing judge must not cost a model load
    bar = tqdm(
        total=len(stages),
        unit="stage",
        disable=True if args.no_progress else None,
        file=sys.stderr,
        bar_format="{desc}: {n_fmt}/{total_fmt} stages [{elapsed}]",
    )
    timing, model, processor, judgement = {}, None, None, None
    try:
        for stage in stages:
            bar.set_description(stage)
            start = time.perf_counter()
            if stage == "load model":
                model, processor = load_model(model_name, args.dtype, device)
            elif stage == "judge":
                judge = make_judge(args, model, processor)
                try:
                    [judgement] = judge.judge([image], [args.prompt])
                except JudgeError as err:
                    raise CLIError(f"the {args.judge} judge failed: {err}", code=3) from None
            else:
                decoder = SafeCoDeDecoder(
                    model,
                    processor,
                    params,
                    steer_steps=args.steer_steps,
                    noise_std=args.noise_std,
                    seed=args.seed,
                    backend=args.backend,
                    recipe=_recipe(args),
                )
                max_new = args.max_new_tokens
                if max_new is None and args.recipe == "paper":
                    max_new = 128
                try:
                    result = decoder.generate(
                        [image],
                        [args.prompt],
                        [judgement.verdict],
                        max_new_tokens=max_new,
                        max_new_tokens_unsafe=args.max_new_tokens_unsafe,
                        **_sampling(args),
                        system_prompt=args.system_prompt,
                        system_prompt_role=args.system_prompt_role,
                        text_before_image=args.text_before_image,
                    )
                except StepError as err:  # the model's logits, not the user's input (exit 1)
                    raise CLIError(f"decoding failed: {err}", code=1) from None
                except ValueError as err:
                    raise CLIError(f"cannot generate: {err}") from None
            timing[stage.replace(" ", "_") + "_s"] = time.perf_counter() - start
            bar.update()
    finally:
        bar.close()

    verdict = judgement.verdict.name.lower()
    steering = [
        {
            "step": r.step,
            "token": r.token,
            "refusal_mass_before": _finite(r.refusal_mass_before),
            "refusal_mass_after": _finite(r.refusal_mass_after),
            "action": r.action,
            "phrase": r.phrase,
        }
        for r in result.steering[0]
    ]
    if args.json:
        out = {
            "model": args.model,
            "image": args.image,
            "prompt": args.prompt,
            "verdict": verdict,
            "judge": judge_record(args.judge, judgement),
            "text": result.texts[0],
            "error": result.errors[0],
            "tokens": result.sequences[0],
            "steering": steering,
            "settings": settings_record(args, params, verdict, device),
            "timing": timing,
        }
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return _ended_early(result.errors[0])
    how = (
        "fixed"
        if args.judge == "fixed"
        else (
            f"{args.judge} judge, "
            + (
                "parsed from its answer"
                if judgement.parsed
                else f"its answer named no verdict, so the {args.on_unparseable!r} policy"
            )
        )
    )
    print(f"verdict:  {verdict} ({how})")
    if judgement.caption is not None:
        print(f"caption:  {shown(judgement.caption)}")
    if judgement.raw_answer and args.judge != "fixed":
        print(f"judge:    {judgement.raw_answer!r}")
    print(settings_line(args, params, verdict))
    if verdict == "none":
        print(f"steering: none: the answer was not steered (verdict none; {args.recipe} recipe)")
    elif not args.steer_steps:
        print(f"steering: none: the answer was not steered (--steer-steps 0; {args.recipe} recipe)")
    phrases = [s["phrase"] for s in steering if s["phrase"]]
    if phrases:
        print(f"steering: forced the refusal phrase {phrases[0]!r} (released recipe)")
    if args.recipe == "paper" and params.sensitive_top_k == 0 and args.steer_steps:
        print("steering: --sensitive-top-k 0 makes the sensitive set empty: no refusal bias, the contrast alone")
    # Under verdict none the paper recipe still records its steps (unchanged masses): not steering.
    masses = [s for s in steering if s["refusal_mass_before"] is not None and verdict != "none"]
    if masses:
        per_step = ", ".join(f"{s['refusal_mass_before']:.3f}->{s['refusal_mass_after']:.3f}" for s in masses)
        print(f"steering: refusal mass per steered step ({args.recipe} recipe, before->after): {per_step}")
    print(f"answer:   {shown(result.texts[0])}")
    return _ended_early(result.errors[0])


def shown(text: str, indent: int = 10) -> str:
    """Model text for a terminal: control and other non-printable characters escaped as
    ``repr`` escapes them (a model's output must not drive the terminal), line breaks kept
    with the continuation lines indented under the label's text."""
    lines = [line if line.isprintable() else repr(line)[1:-1] for line in text.split("\n")]
    return ("\n" + " " * indent).join(lines)


def _ended_early(error: str | None) -> int:
    """Exit status 1 (a runtime failure, not bad input) when decoding ended the answer early."""
    if error is None:
        return 0
    print(f"safecode-kernels generate: error: the answer ended early: {error}", file=sys.stderr)
    return 1


# ----- the parser -----------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(
        prog="safecode-kernels",
        description="Safety-aware Contrastive Decoding (SafeCoDe, arXiv 2509.19212) for multimodal LLMs.",
        epilog="Exit status: 0 ok, 1 failure while running, 2 bad input, 3 the judge failed.",
    )
    parser.add_argument("--version", action="version", version=f"safecode-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="naive loop vs fused decoder on a tiny random LLaVA built in code",
        description="Build a small randomly initialised LLaVA in code, run a few requests with "
        "mixed verdicts through the naive loop and the fused decoder, and show that "
        "they agree token for token, their times, and what the steering did. "
        "The model is random: its words are noise.",
    )
    demo.add_argument("--requests", type=int, default=4, help="number of requests, 1-6 (default 4)")
    demo.add_argument("--max-new-tokens", type=int, default=16, help="tokens per answer (default 16)")
    demo.add_argument("--steer-steps", type=int, default=5, help="steered first tokens (default 5)")
    demo.add_argument("--seed", type=int, default=0, help="weights, images and noise (default 0)")
    demo.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "cpu", "triton"],
        help="backend of the step op (default auto)",
    )
    demo.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0 keeps torch's default)")
    demo.add_argument(
        "--toy",
        action="store_true",
        help="instead: a TOY model, nudged in code, on which the verdict visibly decides whether the answer "
        "opens with a refusal (seconds; default: off)",
    )
    demo.add_argument("--json", action="store_true", help="print the report as JSON (default: text)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar on a terminal)")
    demo.set_defaults(handler=_cmd_demo)

    gen = sub.add_parser(
        "generate",
        help="answer one (image, prompt) with SafeCoDe on a real model",
        description="Answer one request with SafeCoDe steering on a Hugging Face multimodal model "
        "(LLaVA-1.5, LLaVA-NeXT, Qwen2/2.5/3-VL, InstructBLIP, Idefics2/3) from a local folder, "
        "or from the hub where reachable (HF_HUB_OFFLINE=1 is respected). The verdict comes from "
        "--verdict, or from a judge.",
    )
    gen.add_argument(
        "--model",
        required=True,
        metavar="PATH_OR_ID",
        help="a folder written by save_pretrained (model + processor), or a hub id",
    )
    gen.add_argument("--image", required=True, metavar="FILE", help="the image file")
    gen.add_argument("--prompt", required=True, metavar="TEXT", help="the user's request (not empty)")
    gen.add_argument(
        "--verdict",
        default="auto",
        type=choice,
        choices=["auto", "unsafe", "safe", "none"],
        help="the scene-level verdict, any case; auto (default) asks the judge",
    )
    gen.add_argument(
        "--judge",
        choices=["self", "openai", "fixed"],
        default=None,
        help="who gives the verdict with --verdict auto: self (the model itself, default) or "
        "openai (an OpenAI-compatible server); fixed goes with an explicit --verdict",
    )
    gen.add_argument(
        "--judge-flow",
        default="one-call",
        choices=["one-call", "released"],
        help="how the self or openai judge asks: one-call (default; for self, a caption pass then "
        "a question with the image) or released (as the authors' released code: a caption "
        "call, then a text-only few-shot verdict call)",
    )
    gen.add_argument(
        "--on-unparseable",
        default="safe",
        type=choice,
        choices=["safe", "unsafe", "none", "raise"],
        help="the verdict when the judge's answer names none (default safe)",
    )
    gen.add_argument(
        "--judge-url",
        default=os.environ.get("OPENAI_BASE_URL", "https://api.openai.com/v1"),
        help="base URL of the chat-completions server (default $OPENAI_BASE_URL or the OpenAI API)",
    )
    gen.add_argument("--judge-model", default="gpt-4o-mini", help="model name on that server (default gpt-4o-mini)")
    gen.add_argument(
        "--judge-key-env",
        default="OPENAI_API_KEY",
        help="environment variable holding the API key (default OPENAI_API_KEY; unset: no key sent)",
    )
    gen.add_argument("--judge-timeout", type=float, default=30.0, help="seconds per judge request (default 30)")
    gen.add_argument(
        "--judge-retries", type=int, default=2, help="retries after 429, 5xx, timeouts, connection errors (default 2)"
    )
    gen.add_argument("--steer-steps", type=int, default=5, help="steered first tokens (default 5)")
    gen.add_argument("--alpha", type=float, default=0.3, help="weight of the noised branch (default 0.3)")
    gen.add_argument("--alpha-safe", type=float, default=None, help="alpha for safe verdicts (default alpha/2)")
    gen.add_argument(
        "--sensitive-top-k",
        type=int,
        default=None,
        help="size of the sensitive set, the top-k of the contrast whose refusal tokens get the bias "
        "(default 20; 0: an empty set, so no refusal bias, the contrast alone)",
    )
    gen.add_argument("--boost", type=float, default=None, help="refusal logit bias for unsafe (default 1)")
    gen.add_argument(
        "--suppress", type=float, default=None, help="refusal logit penalty for safe (default 1; inf bans them)"
    )
    gen.add_argument(
        "--noise-std", type=float, default=0.1, help="noise of the noised image, in [0, 1] pixel units (default 0.1)"
    )
    gen.add_argument(
        "--recipe",
        default="paper",
        choices=["paper", "released"],
        help="paper: SafeCoDe as the paper describes it (default); released: as the authors' released "
        "code decodes (forced refusal phrase, scaled refusal probabilities; --alpha-safe, "
        "--sensitive-top-k, --boost, --suppress do not apply)",
    )
    gen.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="answer length limit (default: 128; with --recipe released the released code's caps)",
    )
    gen.add_argument(
        "--max-new-tokens-unsafe",
        type=int,
        default=None,
        help="answer length limit for unsafe verdicts (default: --max-new-tokens)",
    )
    gen.add_argument(
        "--temperature",
        type=float,
        default=None,
        help=">= 0; 0: greedy; > 0: sampling (default: greedy; the released code's values with --recipe released)",
    )
    gen.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="nucleus sampling, in (0, 1], used when sampling (default 1; the released code's values with "
        "--recipe released)",
    )
    gen.add_argument(
        "--system-prompt", default=None, help="an instruction: a system message before the image (default: none)"
    )
    gen.add_argument(
        "--system-prompt-role",
        default="system",
        choices=["system", "user"],
        help="system (default): a system message; user: the start of the user's turn, as the "
        "released code puts its first-person instruction",
    )
    gen.add_argument(
        "--text-before-image",
        action="store_true",
        help="the request's text before the image (the released code's order for LLaVA-NeXT; default: image first)",
    )
    gen.add_argument("--seed", type=int, default=0, help="noise and sampling seed (default 0)")
    gen.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype (default: the checkpoint's)",
    )
    gen.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    gen.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "cpu", "triton"],
        help="backend of the step op (default auto)",
    )
    gen.add_argument("--json", action="store_true", help="print the result as JSON (default: text)")
    gen.add_argument("--no-progress", action="store_true", help="no progress bar (default: a bar on a terminal)")
    gen.set_defaults(handler=_cmd_generate)

    bench = sub.add_parser(
        "bench",
        add_help=False,
        help="the end-to-end benchmarks (arguments passed through; `safecode-kernels bench --help` lists them)",
    )
    bench.set_defaults(handler=_cmd_bench)  # every argument after `bench` goes to the benchmark

    info = sub.add_parser("info", help="versions and the backends available here (and why not)")
    info.add_argument("--json", action="store_true", help="print as JSON (default: text)")
    info.set_defaults(handler=_cmd_info)
    from .eval_cli import register  # eval, score, report (imported here: eval_cli imports this module)

    register(sub)
    return parser


def subcommand_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The parser of ``command`` (``parser`` itself when there is none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def main(argv=None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command == "bench":
            args.bench_args = extra
        elif extra:  # the subcommand's usage error: its prog, and its --help
            subcommand_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit_:  # --help, --version, or a usage error (already printed)
        return int(exit_.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except CLIError as err:
        print(f"safecode-kernels {args.command}: error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one readable line, the traceback on request
        if os.environ.get("SAFECODE_DEBUG"):
            raise
        print(
            f"safecode-kernels {args.command}: error: {type(err).__name__}: {err} "
            "(set SAFECODE_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
