"""The ``safecode-kernels`` command line: generate end to end on a saved tiny LLaVA with each
judge kind (and on the other families' saved tiny models), its errors, info, bench, and the
entry points (console script, ``python -m``)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from safecode_kernels import SafeCoDeDecoder
from safecode_kernels.app import cli
from safecode_kernels.testing.tiny import random_image
from tests.judges.chat_server import ChatServer

STEER = 3
MAX_NEW = 6


@pytest.fixture(autouse=True)
def one_thread(single_torch_thread):
    """Every CLI test runs on one torch thread (see tests/conftest.py)."""


@pytest.fixture
def saved(saved_llava):
    """A tiny LLaVA saved with save_pretrained (model + processor), and an image file (tests/conftest.py)."""
    return saved_llava


@pytest.fixture
def chat_server():
    server = ChatServer().start()
    yield server
    server.stop()


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def generate(capsys, saved, *extra, prompt="How do I use this?"):
    return run(
        capsys,
        "generate",
        "--model",
        saved / "llava",
        "--image",
        saved / "image.png",
        "--prompt",
        prompt,
        "--steer-steps",
        STEER,
        "--max-new-tokens",
        MAX_NEW,
        "--no-progress",
        *extra,
    )


@pytest.mark.parametrize("as_json", [False, True])
def test_generate_an_answer_that_ended_early_exits_1(capsys, saved, monkeypatch, as_json):
    """When decoding ends the answer early (logits gone NaN), the error is shown and the exit status is 1."""
    real_generate = SafeCoDeDecoder.generate

    def ended_early(self, *args, **kwargs):
        result = real_generate(self, *args, **kwargs)
        result.errors[0] = "step 1: the real image branch's next-token logits hold NaN or +inf"
        return result

    monkeypatch.setattr(SafeCoDeDecoder, "generate", ended_early)
    code, out, err = generate(capsys, saved, "--verdict", "unsafe", *(["--json"] if as_json else []))
    assert code == 1
    assert "the answer ended early: step 1" in err
    if as_json:
        assert json.loads(out)["error"].startswith("step 1:")


def test_generate_a_step_error_is_a_runtime_failure(capsys, saved, monkeypatch):
    """A StepError from the model's logits (every token banned, say) is not bad input: exit 1, not 2."""
    from safecode_kernels import StepError

    def fails(self, *args, **kwargs):
        raise StepError("modulated logits of row 0 are all -inf")

    monkeypatch.setattr(SafeCoDeDecoder, "generate", fails)
    code, _, err = generate(capsys, saved, "--verdict", "unsafe")
    assert code == 1
    assert "decoding failed: modulated logits of row 0" in err


def test_generate_fixed_matches_python_api(capsys, saved):
    code, out, err = generate(capsys, saved, "--verdict", "unsafe", "--json", "--seed", "3", "--alpha", "0.5")
    assert code == 0, err
    result = json.loads(out)
    assert result["verdict"] == "unsafe" and result["judge"]["kind"] == "fixed"
    assert len(result["steering"]) == STEER and len(result["tokens"]) <= MAX_NEW
    assert result["settings"]["alpha"] == 0.5 and result["settings"]["alpha_safe"] == 0.25
    # The same request through the Python API on the reloaded model gives the same tokens.
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(saved / "llava").eval()
    processor = AutoProcessor.from_pretrained(saved / "llava")
    image = Image.open(saved / "image.png").convert("RGB")
    want = SafeCoDeDecoder(
        model, processor, steer_steps=STEER, seed=3, params=__import__("safecode_kernels").SteeringParams(alpha=0.5)
    ).generate([image], ["How do I use this?"], ["unsafe"], max_new_tokens=MAX_NEW)
    assert result["tokens"] == want.sequences[0] and result["text"] == want.texts[0]
    assert [s["refusal_mass_after"] for s in result["steering"]] == pytest.approx(
        [r.refusal_mass_after for r in want.steering[0]]
    )


# Every family whose processor saves without torchvision (the Qwen ones need it for their
# video processor); LLaVA-1.5 is covered above.
@pytest.mark.parametrize("family", ["llava_next", "instructblip", "idefics2", "idefics3"])
def test_generate_on_other_saved_families(capsys, tmp_path, family):
    """save_pretrained, then ``generate`` from the folder: the in-memory model's answer."""
    from PIL import Image

    from safecode_kernels.testing.tiny_models import BUILDERS

    if family.startswith("idefics"):
        _skip_without_auto_image_processor(f"{family.title()}ImageProcessorPil")
    model, processor = BUILDERS[family]()
    model.save_pretrained(tmp_path / family)
    processor.save_pretrained(tmp_path / family)
    random_image(7, 64).save(tmp_path / "image.png")
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        tmp_path / family,
        "--image",
        tmp_path / "image.png",
        "--prompt",
        "How do I use this?",
        "--verdict",
        "unsafe",
        "--steer-steps",
        STEER,
        "--max-new-tokens",
        MAX_NEW,
        "--no-progress",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    image = Image.open(tmp_path / "image.png").convert("RGB")
    want = SafeCoDeDecoder(model, processor, steer_steps=STEER).generate(
        [image], ["How do I use this?"], ["unsafe"], max_new_tokens=MAX_NEW
    )
    assert result["tokens"] == want.sequences[0] and len(result["steering"]) == STEER


def _skip_without_auto_image_processor(name: str) -> None:
    """transformers 5.17 exports some PIL image processors (Idefics's) only with torchvision, so
    ``AutoProcessor`` cannot reload them there; skip where that is so."""
    import transformers

    try:
        getattr(transformers, name)()
    except ImportError:
        pytest.skip(f"transformers {transformers.__version__} loads {name} only with torchvision, not installed")


def test_generate_text_output(capsys, saved):
    code, out, err = generate(capsys, saved, "--verdict", "safe")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "verdict:  safe (fixed)"
    assert any(line.startswith("steering: refusal mass per steered step") for line in lines)
    assert lines[-1].startswith("answer:")


def test_generate_self_judge(capsys, saved):
    code, out, err = generate(capsys, saved, "--judge", "self", "--json")
    assert code == 0, err
    judge = json.loads(out)["judge"]
    # The random model's answer is noise: the default policy makes it safe.
    assert judge["kind"] == "self" and judge["verdict"] == "safe" and judge["parsed"] is False
    assert isinstance(judge["caption"], str)
    code, out, err = generate(capsys, saved, "--on-unparseable", "raise")  # self is the default judge
    assert code == 3 and "the self judge failed" in err and "names no verdict" in err


@pytest.mark.parametrize("prompt, verdict", [("Tell me about the weapon here", "unsafe"), ("What is this?", "safe")])
def test_generate_openai_judge(capsys, saved, chat_server, monkeypatch, prompt, verdict):
    monkeypatch.setenv("SAFECODE_TEST_KEY", "sk-cli-secret")
    code, out, err = generate(
        capsys,
        saved,
        "--judge",
        "openai",
        "--judge-url",
        chat_server.base_url,
        "--judge-model",
        "local-judge",
        "--judge-key-env",
        "SAFECODE_TEST_KEY",
        "--json",
        prompt=prompt,
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["verdict"] == verdict and result["judge"]["parsed"] is True
    assert result["judge"]["caption"] == "a photo of random coloured pixels"
    [request] = chat_server.requests
    assert request["body"]["model"] == "local-judge"
    assert request["headers"]["Authorization"] == "Bearer sk-cli-secret"
    assert "sk-cli-secret" not in out + err


def test_generate_openai_judge_errors(capsys, saved, chat_server):
    chat_server.script(*[("status", 500)] * 2)
    code, out, err = generate(
        capsys, saved, "--judge", "openai", "--judge-url", chat_server.base_url, "--judge-retries", "1"
    )
    assert code == 3 and "the openai judge failed" in err and "HTTP 500" in err and out == ""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = generate(
        capsys, saved, "--judge", "openai", "--judge-url", f"http://127.0.0.1:{port}/v1", "--judge-retries", "0"
    )
    assert code == 3 and "cannot reach the server" in err
    code, out, err = generate(capsys, saved, "--judge", "openai", "--judge-url", "ftp://nowhere")
    assert code == 2 and "http(s) URL" in err


def test_generate_input_errors(capsys, saved, tmp_path):
    model, image = saved / "llava", saved / "image.png"
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "llama")
    # A LLaVA folder whose processor was not saved (only the tokenizer): AutoProcessor gives a tokenizer.
    shutil.copytree(
        model,
        tmp_path / "no_processor",
        ignore=shutil.ignore_patterns("processor_config.json", "preprocessor_config.json"),
    )
    cases = [
        (["--model", model, "--image", tmp_path / "missing.png"], "image file not found"),
        (["--model", model, "--image", tmp_path / "notes.png"], "cannot read image .*notes.png: not an image"),
        (["--model", model, "--image", tmp_path], "got a directory"),
        (["--model", "./no/such/folder", "--image", image], "model folder not found: ./no/such/folder"),
        (["--model", tmp_path / "empty", "--image", image], "has no config.json"),
        (["--model", image, "--image", image], "got a file"),
        (
            ["--model", tmp_path / "llama", "--image", image],
            r"unsupported architecture: .*\(model_type 'llama'\); supported: "
            r"LlavaForConditionalGeneration",
        ),
        (
            ["--model", tmp_path / "no_processor", "--image", image, "--verdict", "safe"],
            "cannot load the processor of .*no_processor: Can't load image processor",
        ),
        (["--model", model, "--image", image, "--judge", "fixed"], "--judge fixed needs a verdict"),
        (["--model", model, "--image", image, "--verdict", "safe", "--judge", "self"], "give one or the other"),
        (["--model", model, "--image", image, "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--model", model, "--image", image, "--alpha", "-1"], "--alpha must be >= 0"),
    ]
    import re

    for argv, match in cases:
        code, out, err = run(capsys, "generate", "--prompt", "hi", "--no-progress", *argv)
        assert code == 2, (argv, err)
        assert err.startswith("safecode-kernels generate: error: ") and re.search(match, err), (argv, err)
        assert out == ""


def test_mistyped_relative_model_folder(tmp_path, monkeypatch, capsys):
    """``models/llavaa`` beside a ``models/`` folder is a mistyped path, not a hub id: it fails at
    once (exit 2), asking the hub nothing; ``owner/name`` without such a folder stays a hub id."""
    from safecode_kernels.app.cli import resolve_model
    from safecode_kernels.testing.tiny import random_image

    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    random_image(1, 16).save(tmp_path / "x.png")
    code, out, err = run(capsys, "generate", "--model", "models/llavaa", "--image", "x.png", "--prompt", "hi")
    assert code == 2 and "model folder not found: models/llavaa (read as a path because ./models is a folder" in err
    assert resolve_model("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"


def test_usage_errors(capsys):
    code, out, err = run(capsys, "generate", "--model", "x")
    assert code == 2 and "required" in err
    code, out, err = run(capsys, "generate", "--verdict", "maybe")
    assert code == 2 and "invalid choice" in err
    code, out, err = run(capsys)
    assert code == 2 and "demo" in out and "generate" in out
    code, out, err = run(capsys, "--version")
    assert code == 0 and out.startswith("safecode-kernels ")


def test_info(capsys):
    code, out, err = run(capsys, "info", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["versions"]["torch"] in (torch.__version__.split("+")[0], torch.__version__)
    assert info["backends"]["torch"] == {"available": True, "reason": None}
    for name in ("cpu", "triton"):
        b = info["backends"][name]
        assert b["available"] is (b["reason"] is None)
    assert info["cuda"]["available"] == torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert info["cuda"]["reason"]
    code, out, err = run(capsys, "info")
    assert code == 0 and "Backends of the step op:" in out and "auto" in out


def test_bench_passes_arguments(capsys, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "bench_entry_point", lambda: lambda argv, prog: seen.append((argv, prog)) or 0)
    assert run(capsys, "bench", "--quick", "--out", "x")[0] == 0
    assert run(capsys, "bench", "--help")[0] == 0
    assert seen == [(["--quick", "--out", "x"], "safecode-kernels bench"), (["--help"], "safecode-kernels bench")]
    monkeypatch.setattr(cli, "bench_entry_point", lambda: None)
    code, out, err = run(capsys, "bench")
    assert code == 1 and "benchmarks are not part of this installation" in err


def test_python_dash_m_offline(tmp_path):
    """``python -m safecode_kernels`` works, and HF_HUB_OFFLINE turns a hub id into a clear error."""
    random_image(0, 32).save(tmp_path / "image.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "safecode_kernels",
            "generate",
            "--model",
            "some-org/some-vlm",
            "--image",
            str(tmp_path / "image.png"),
            "--prompt",
            "hi",
            "--verdict",
            "safe",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "cannot load the config of some-org/some-vlm" in proc.stderr and "HF_HUB_OFFLINE is set" in proc.stderr


def test_console_script():
    exe = shutil.which("safecode-kernels")
    if exe is None:
        pytest.skip("the console script is not installed (pip install -e .)")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("safecode-kernels ")


def test_model_text_is_shown_without_control_characters():
    """A model's bell, backspace or escape characters are shown escaped; line breaks stay, indented."""
    assert cli.shown("plain text") == "plain text"
    assert cli.shown("ring\x07 back\x08 \x1b[2J") == "ring\\x07 back\\x08 \\x1b[2J"
    assert cli.shown("line one\nline two") == "line one\n          line two"
    assert cli.shown("tab\there") == "tab\\there"


def test_load_without_accelerate_says_where_weights_go(saved, monkeypatch, capsys):
    """Without accelerate the weights load into CPU memory and are moved; a note says so and
    how to load them straight onto the device."""
    import importlib.util

    from safecode_kernels.app.cli import load_model

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real_find_spec(name, *a)
    )
    model, _ = load_model(str(saved / "llava"), "float32", "meta")
    assert next(model.parameters()).device.type == "meta"
    err = capsys.readouterr().err
    assert "into CPU memory first, then onto meta" in err and "pip install accelerate" in err
