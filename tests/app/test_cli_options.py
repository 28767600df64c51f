"""The command line's options as a new user meets them: every value the Python API rejects is
rejected (exit 2, one line naming the option) whatever else is given, a usage error is short,
verdicts take any case, a fixed verdict does not pose as an unparsed answer, a local folder loads
without asking the hub, ``--sensitive-top-k 0`` says what it does, and every option's help
shows its default."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from safecode_kernels import SteeringParams
from safecode_kernels.app import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread(single_torch_thread):
    """Every CLI test runs on one torch thread (see tests/conftest.py)."""


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def command(*argv):
    """``safecode-kernels ARGV`` as a user runs it: the installed console script (``python -m
    safecode_kernels`` where it is not installed), importing this checkout's code."""
    exe = shutil.which("safecode-kernels")
    head = [exe] if exe else [sys.executable, "-m", "safecode_kernels"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([*head, *map(str, argv)], capture_output=True, text=True, env=env, timeout=300)


def generate_argv(saved, *extra, prompt="How do I use this?"):
    return [
        "generate",
        "--model",
        saved / "llava",
        "--image",
        saved / "image.png",
        "--prompt",
        prompt,
        "--steer-steps",
        "2",
        "--max-new-tokens",
        "3",
        "--no-progress",
        *extra,
    ]


# Options the Python API rejects, each with what the message must say; some with other options
# that used to hide the check (a greedy run ignored --temperature and --top-p).
REJECTED = [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--temperature", "nan"], "--temperature must be finite"),
    (["--temperature", "inf"], "--temperature must be finite"),
    (["--top-p", "1.5"], "--top-p must be <= 1"),
    (["--top-p", "0"], "--top-p must be > 0"),
    (["--top-p", "1.5", "--recipe", "released"], "--top-p must be <= 1"),
    (["--noise-std", "-1"], "--noise-std must be a finite number >= 0"),
    (["--noise-std", "nan"], "--noise-std must be a finite number >= 0"),
    (["--sensitive-top-k", "-1"], "--sensitive-top-k must be >= 0"),
    (["--alpha-safe", "-0.5"], "--alpha-safe must be >= 0"),
    (["--alpha", "-1", "--recipe", "released"], "--alpha must be >= 0"),
    (["--boost", "inf"], "--boost must be finite"),
    (["--suppress", "nan"], "--suppress must be a number or \\+inf"),
    (["--steer-steps", "-1"], "--steer-steps must be >= 0"),
    (["--max-new-tokens-unsafe", "0"], "--max-new-tokens-unsafe must be >= 1"),
    (["--judge-timeout", "0", "--judge", "openai"], "--judge-timeout must be"),
    (["--judge-retries", "-1"], "--judge-retries must be >= 0"),
    # The paper recipe's options, given with the released recipe (which would ignore them).
    (["--recipe", "released", "--boost", "2"], "--boost does not apply with --recipe released"),
    (
        ["--recipe", "released", "--sensitive-top-k", "20", "--alpha-safe", "0.1"],
        "--alpha-safe, --sensitive-top-k do not apply with --recipe released",
    ),
    (["--recipe", "released", "--suppress", "1"], "--suppress does not apply with --recipe released"),
]


@pytest.mark.parametrize("extra, message", REJECTED, ids=[" ".join(e) for e, _ in REJECTED])
def test_generate_rejects_what_the_api_rejects(capsys, saved_llava, extra, message):
    import re

    code, out, err = run(capsys, *generate_argv(saved_llava, *extra))
    assert code == 2, err
    assert re.fullmatch(f"safecode-kernels generate: error: {message}.*\n", err), err
    assert out == ""


@pytest.mark.parametrize(
    "field, value",
    [("temperature", -1.0), ("temperature", float("nan")), ("top_p", 1.5), ("sensitive_top_k", -1)],
)
def test_the_api_rejects_the_same_values(field, value):
    """The same values through the Python API: the command line adds no rule of its own."""
    with pytest.raises(ValueError, match=field):
        SteeringParams(**{field: value})


@pytest.mark.parametrize("prompt", ["", "   ", "\t\n"])
def test_generate_rejects_an_empty_prompt(capsys, saved_llava, prompt):
    code, out, err = run(capsys, *generate_argv(saved_llava, "--verdict", "safe", prompt=prompt))
    assert code == 2 and err.startswith("safecode-kernels generate: error: --prompt is empty"), err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperature", "-1"], "--temperature must be >= 0"),
        (["--top-p", "1.5"], "--top-p must be <= 1"),
        (["--noise-std", "-1"], "--noise-std must be a finite number >= 0"),
    ],
)
def test_installed_command_rejects_bad_values(saved_llava, extra, message):
    """Through the installed command: exit 2 and one line, where these ran (or exited 1) before."""
    proc = command(*generate_argv(saved_llava, "--verdict", "unsafe", *extra))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and message in proc.stderr
    assert proc.stderr.startswith("safecode-kernels generate: error: ") and proc.stdout == ""


def test_installed_command_usage_error_is_short():
    """An argument error prints the error and where the options are, not the whole usage block."""
    proc = command("generate", "--model", "m", "--image", "i.png", "--prompt", "hi", "--verdict", "maybe")
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("safecode-kernels generate: error: argument --verdict: invalid choice: 'maybe'")
    assert len(lines) == 2 and "safecode-kernels generate --help" in lines[1]
    assert "usage:" not in proc.stderr


def test_eval_rejects_what_the_decoder_rejects(capsys, tmp_path):
    for extra, message in (
        (["--noise-std", "nan"], "--noise-std must be a finite number >= 0"),
        (["--steer-steps", "-2"], "--steer-steps must be >= 0"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--judge-timeout", "-1"], "--judge-timeout must be"),
    ):
        code, out, err = run(
            capsys, "eval", "--model", "m", "--benchmark", "jsonl", "--data", "x.jsonl", "--out", tmp_path, *extra
        )
        assert code == 2 and err.startswith(f"safecode-kernels eval: error: {message}"), (extra, err)


def test_verdicts_take_any_case_and_a_fixed_verdict_is_not_parsed(capsys, saved_llava):
    """``--verdict UNSAFE`` as ``Verdict.parse("UNSAFE")``; the JSON's ``parsed`` says whether the
    verdict was read from a judge's answer, so a fixed verdict has none (null), not ``false``
    (which means "the judge's answer named no verdict")."""
    code, out, err = run(capsys, *generate_argv(saved_llava, "--verdict", "UNSAFE", "--json"))
    assert code == 0, err
    result = json.loads(out)
    assert result["verdict"] == "unsafe"
    assert result["judge"] == {
        "kind": "fixed",
        "verdict": "unsafe",
        "caption": None,
        "raw_answer": None,
        "parsed": None,
    }
    code, out, err = run(capsys, *generate_argv(saved_llava, "--verdict", " Safe"))
    assert code == 0 and out.startswith("verdict:  safe (fixed)\n"), err


def test_on_unparseable_takes_any_case(capsys, saved_llava):
    code, out, err = run(capsys, *generate_argv(saved_llava, "--on-unparseable", "UNSAFE", "--json"))
    assert code == 0, err
    judge = json.loads(out)["judge"]
    # The tiny random model's answer names no verdict: the policy, given in capitals, decides.
    assert judge["kind"] == "self" and judge["parsed"] is False and judge["verdict"] == "unsafe"


def test_a_local_folder_loads_without_the_hub(capsys, saved_llava, monkeypatch):
    """Every ``from_pretrained`` of an existing folder gets ``local_files_only=True``: nothing
    asks the hub (an offline machine would spend its retries there first)."""
    import transformers

    calls = []
    for name in ("AutoConfig", "AutoProcessor", "AutoModelForImageTextToText"):
        cls = getattr(transformers, name)
        original = cls.from_pretrained

        def recording(*args, _original=original, _name=name, **kwargs):
            calls.append((_name, str(args[0]), kwargs.get("local_files_only")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", recording)
    code, out, err = run(capsys, *generate_argv(saved_llava, "--verdict", "safe"))
    assert code == 0, err
    assert {name for name, _, _ in calls} == {"AutoConfig", "AutoProcessor", "AutoModelForImageTextToText"}
    assert all(path == str(saved_llava / "llava") and local is True for _, path, local in calls), calls
    assert cli.hub_options("some-org/some-model") == {}  # a hub id still goes to the hub


def test_sensitive_top_k_zero_is_the_contrast_alone(capsys, saved_llava):
    """``--sensitive-top-k 0``: an empty sensitive set (docs/design.md §2), so no refusal bias;
    the output says so, and the help names it."""
    code, out, err = run(capsys, *generate_argv(saved_llava, "--verdict", "unsafe", "--sensitive-top-k", "0"))
    assert code == 0, err
    assert "--sensitive-top-k 0 makes the sensitive set empty: no refusal bias" in out
    code, out, err = run(capsys, *generate_argv(saved_llava, "--verdict", "unsafe", "--sensitive-top-k", "0", "--json"))
    steering = json.loads(out)["steering"]
    assert all(s["refusal_mass_before"] == s["refusal_mass_after"] for s in steering)
    help_text = " ".join(_options(cli.build_parser(), "generate")["--sensitive-top-k"].help.split())
    assert "0: an empty set, so no refusal bias" in help_text


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _options(parser: argparse.ArgumentParser, command: str) -> dict[str, argparse.Action]:
    sub = _subparsers(parser)[command]
    return {a.option_strings[-1] if a.option_strings else a.dest: a for a in sub._actions}


def _every_option():
    from safecode_kernels.app.benchmarking import decode

    parsers = dict(_subparsers(cli.build_parser()))
    parsers["bench"] = decode.build_parser("safecode-kernels bench")
    for command_name, parser in parsers.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            yield command_name, action


def test_every_option_has_help_that_shows_its_default():
    missing = []
    for command_name, action in _every_option():
        name = "/".join(action.option_strings) or action.dest
        help_text = action.help or ""
        if not help_text.strip() or help_text == argparse.SUPPRESS:
            missing.append(f"{command_name} {name}: no help")
        elif action.option_strings and not action.required and "default" not in help_text:
            missing.append(f"{command_name} {name}: help shows no default ({help_text!r})")
    assert not missing, "\n".join(missing)


def test_bench_help_names_the_command(capsys):
    code, out, err = run(capsys, "bench", "--help")
    assert code == 0
    assert out.startswith("usage: safecode-kernels bench ")
    assert "2-core" not in out and "this machine" not in out
    assert "--phases" in out and "a whole answer" in " ".join(out.split())


@pytest.mark.parametrize(
    "device, message",
    [("gpu", "--device 'gpu' is not a device"), ("cuda", "--device cuda: no CUDA device is available")],
)
def test_a_bad_or_absent_device_is_bad_input(capsys, saved_llava, device, message):
    """Exit 2 with one line, before the model loads (not torch's error after it, exit 1)."""
    if device == "cuda" and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = run(capsys, *generate_argv(saved_llava, "--verdict", "safe", "--device", device))
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "option", [["--batches", "0"], ["--reps", "0"], ["--naive-reps", "0"], ["--threads", "0"], ["--backend", "gpu"]]
)
def test_bench_counts_and_backend_are_checked_before_any_model_is_built(capsys, monkeypatch, option):
    from safecode_kernels.app.benchmarking import decode

    monkeypatch.setattr(decode, "run", lambda *args: pytest.fail("the benchmark ran"))
    code, _, err = run(capsys, "bench", "--tiny", *option)
    assert code == 2, err
    assert option[0] in err


def test_a_bare_model_name_fails_at_once(capsys, tmp_path, monkeypatch):
    """``--model nope`` is no folder here and no hub id (those are ``owner/name``): exit 2 at
    once, before anything asks the hub (offline, its retries took half a minute)."""
    import transformers

    from safecode_kernels.testing.tiny import random_image

    monkeypatch.chdir(tmp_path)
    random_image(1, 16).save(tmp_path / "x.png")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: pytest.fail("asked the hub"))
    code, out, err = run(capsys, "generate", "--model", "nope", "--image", "x.png", "--prompt", "hi")
    assert code == 2 and out == ""
    assert err == (
        "safecode-kernels generate: error: model folder not found: nope "
        "(no such folder here; a hub model id is written owner/name)\n"
    )
    (tmp_path / "nope").mkdir()  # a folder of that name is read as the folder
    with pytest.raises(cli.CLIError, match="model folder nope has no config.json"):
        cli.resolve_model("nope")
    assert cli.resolve_model("some-org/some-model") == "some-org/some-model"


UNAVAILABLE = {"cpu": "the C++ extension safecode_kernels._C is not built", "triton": "no CUDA device"}


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_a_backend_that_cannot_run_here_is_bad_input(capsys, saved_llava, monkeypatch, backend):
    """``--backend triton`` without CUDA (and no interpreter), ``--backend cpu`` without the C++
    extension: exit 2 with the reason ``backend_status`` gives, before the model loads (it
    used to load it and fail with a RuntimeError, exit 1). The status is set here: the test
    suite itself runs Triton in its interpreter, where the backend does run."""
    from safecode_kernels.ops import dispatch

    monkeypatch.setattr(dispatch, "backend_status", lambda: {"torch": None, **UNAVAILABLE})
    monkeypatch.setattr(cli, "load_model", lambda *a: pytest.fail("the model loaded"))
    monkeypatch.setattr(cli, "load_image", lambda *a: pytest.fail("the image was read first"))
    code, out, err = run(capsys, *generate_argv(saved_llava, "--verdict", "safe", "--backend", backend))
    assert code == 2 and out == ""
    assert err == (
        f"safecode-kernels generate: error: --backend {backend} cannot run here: {UNAVAILABLE[backend]} "
        "(--backend auto picks one that can)\n"
    )


def test_a_usable_backend_runs(capsys, saved_llava, monkeypatch):
    """Where ``backend_status`` says a backend runs, the check lets it through (both on the CPU
    here: the C++ extension, and Triton in its interpreter as this test suite sets it up)."""
    from safecode_kernels.ops import dispatch

    monkeypatch.setattr(dispatch, "backend_status", lambda: {"torch": None, "cpu": None, "triton": None})
    code, out, err = run(capsys, *generate_argv(saved_llava, "--verdict", "unsafe", "--backend", "cpu", "--json"))
    assert code == 0, err
    assert json.loads(out)["settings"]["backend"] == "cpu"
    cli.check_backend("auto", "cpu")
    with pytest.raises(cli.CLIError, match="--backend cpu cannot run here: it takes CPU tensors, and the model runs"):
        cli.check_backend("cpu", "cuda")


@pytest.mark.parametrize(
    "argv, extra",
    [
        (["generate", "--model", "m", "--image", "i.png", "--prompt", "hi", "--temprature", "1"], "--temprature 1"),
        (["info", "--jsn"], "--jsn"),
        (["score", "run", "--scorre", "x"], "--scorre x"),
        (["demo", "extra"], "extra"),
    ],
)
def test_a_mistyped_option_is_the_subcommands_error(capsys, argv, extra):
    """An unknown option is reported by its subcommand, pointing at that subcommand's help (as
    a missing required argument is), not at the top-level command's."""
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err == (
        f"safecode-kernels {argv[0]}: error: unrecognized arguments: {extra}\n"
        f"(`safecode-kernels {argv[0]} --help` lists the options)\n"
    )
    code, out, err = run(capsys, "--no-such-option")
    assert code == 2 and err.startswith("safecode-kernels: error: unrecognized arguments: --no-such-option\n")


@pytest.mark.parametrize(
    "extra, greedy",
    [
        (["--top-p", "0.5"], True),  # the paper recipe's default is greedy
        (["--top-p", "0.5", "--temperature", "0"], True),
        (["--top-p", "0.5", "--recipe", "released", "--temperature", "0"], True),
        (["--top-p", "0.5", "--temperature", "0.7"], False),
        (["--top-p", "0.5", "--recipe", "released"], False),  # the released recipe samples
        ([], False),  # no --top-p given: nothing to note
    ],
)
def test_top_p_on_a_greedy_run_is_noted(capsys, saved_llava, extra, greedy):
    code, out, err = run(capsys, *generate_argv(saved_llava, "--verdict", "safe", *extra))
    assert code == 0, err
    note = "note: --top-p applies to sampling (--temperature > 0); this run is greedy\n"
    assert (note in err) is greedy, err
