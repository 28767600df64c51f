"""``safecode-kernels generate --recipe released`` and the prompt-layout options, end to end on a
saved tiny LLaVA, against the Python API on the reloaded model."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from safecode_kernels import SafeCoDeDecoder
from safecode_kernels.app import cli
from safecode_kernels.testing.tiny import random_image

INSTRUCTION = "You are looking through my eyes. The user query is: "


@pytest.fixture(autouse=True)
def one_thread(single_torch_thread):
    """One torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def saved(tmp_path_factory, saved_llava):
    """The session's saved tiny LLaVA (tests/conftest.py) beside an image of its own."""
    root = tmp_path_factory.mktemp("cli_recipe")
    (root / "llava").symlink_to(saved_llava / "llava")
    random_image(5, 64).save(root / "image.png")
    return root


def generate(capsys, saved, *extra):
    code = cli.main(
        [
            "generate",
            "--model",
            str(saved / "llava"),
            "--image",
            str(saved / "image.png"),
            "--prompt",
            "How do I use this?",
            "--no-progress",
            "--json",
            "--steer-steps",
            "4",
            *map(str, extra),
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("verdict", ["unsafe", "safe"])
def test_released_recipe_matches_python_api(capsys, saved, verdict):
    got = generate(
        capsys,
        saved,
        "--verdict",
        verdict,
        "--recipe",
        "released",
        "--temperature",
        "0",
        "--system-prompt",
        INSTRUCTION,
        "--system-prompt-role",
        "user",
        "--text-before-image",
    )
    assert got["settings"]["recipe"] == "released"
    model = AutoModelForImageTextToText.from_pretrained(saved / "llava").eval()
    processor = AutoProcessor.from_pretrained(saved / "llava")
    image = Image.open(saved / "image.png").convert("RGB")
    want = SafeCoDeDecoder(model, processor, steer_steps=4, recipe="released").generate(
        [image],
        ["How do I use this?"],
        [verdict],
        do_sample=False,
        system_prompt=INSTRUCTION,
        system_prompt_role="user",
        text_before_image=True,
    )
    assert got["tokens"] == want.sequences[0]
    actions = {s["action"] for s in got["steering"]}
    assert actions == ({"forced"} if verdict == "unsafe" else {"suppressed"})
    if verdict == "unsafe":
        assert got["steering"][0]["phrase"] and got["steering"][1]["refusal_mass_before"] is None
        # No limit given: the released code's cap for LLaVA (20 new tokens past the steered prefix).
        assert len(got["tokens"]) <= 4 + 20


def test_released_recipe_samples_by_default(capsys, saved):
    first = generate(capsys, saved, "--verdict", "safe", "--recipe", "released", "--seed", "1")
    again = generate(capsys, saved, "--verdict", "safe", "--recipe", "released", "--seed", "1")
    assert first["tokens"] == again["tokens"]  # seeded
    assert len(first["tokens"]) > 4
