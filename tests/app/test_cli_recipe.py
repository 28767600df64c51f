"""``safecode-kernels generate --recipe released`` and the prompt-layout options, end to end on a
saved tiny LLaVA, against the Python API on the reloaded model."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from safecode_kernels import SafeCoDeDecoder
from safecode_kernels.app import cli
from safecode_kernels.recipes import ReleasedRecipe
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


def load(saved):
    model = AutoModelForImageTextToText.from_pretrained(saved / "llava").eval()
    processor = AutoProcessor.from_pretrained(saved / "llava")
    return model, processor, Image.open(saved / "image.png").convert("RGB")


@pytest.mark.parametrize("verdict", ["safe", "unsafe", "none"])
def test_released_settings_say_what_applied(capsys, saved, verdict):
    """``settings`` of the released recipe: its alpha and the sampling it used for this verdict
    (the recipe's continuation values; a safe verdict's steered steps at its own temperature),
    none of the paper's parameters. The tokens are those of the Python API given these values
    explicitly: the reported sampling is the one that ran."""
    got = generate(capsys, saved, "--verdict", verdict, "--recipe", "released", "--max-new-tokens", "12")
    recipe = ReleasedRecipe()
    temperature, top_p = recipe.continuation_safe if verdict == "safe" else recipe.continuation_other
    settings = got["settings"]
    assert not set(settings) & {"alpha_safe", "sensitive_top_k", "boost", "suppress"}
    assert settings["recipe"] == "released" and settings["alpha"] == recipe.alpha
    assert (settings["temperature"], settings["top_p"]) == (temperature, top_p)
    assert settings["steered_temperature"] == (recipe.safe_temperature if verdict == "safe" else None)
    model, processor, image = load(saved)
    want = SafeCoDeDecoder(model, processor, steer_steps=4, recipe="released").generate(
        [image], ["How do I use this?"], [verdict], max_new_tokens=12, temperature=temperature, top_p=top_p
    )
    assert got["tokens"] == want.sequences[0]


def test_released_settings_greedy_and_given_top_p(capsys, saved):
    greedy = generate(capsys, saved, "--verdict", "safe", "--recipe", "released", "--temperature", "0")["settings"]
    assert (greedy["temperature"], greedy["top_p"], greedy["steered_temperature"]) == (0.0, None, None)
    given = generate(capsys, saved, "--verdict", "unsafe", "--recipe", "released", "--top-p", "0.6")["settings"]
    assert (given["temperature"], given["top_p"]) == (ReleasedRecipe().continuation_other[0], 0.6)
    paper = generate(capsys, saved, "--verdict", "safe")["settings"]  # the paper recipe: as before
    assert {"alpha_safe", "sensitive_top_k", "boost", "suppress"} <= set(paper) and paper["temperature"] is None


def text(capsys, saved, *extra):
    code = cli.main(
        ["generate", "--model", str(saved / "llava"), "--image", str(saved / "image.png"), "--prompt", "hi"]
        + ["--no-progress", "--steer-steps", "3", "--max-new-tokens", "4", *map(str, extra)]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.splitlines()


@pytest.mark.parametrize("recipe", ["paper", "released"])
def test_text_output_names_the_recipe_and_an_unsteered_answer(capsys, saved, recipe):
    lines = text(capsys, saved, "--recipe", recipe, "--verdict", "safe")
    assert any(line.startswith(f"settings: {recipe} recipe, alpha 0.3") for line in lines), lines
    mass = [line for line in lines if line.startswith("steering: refusal mass per steered step")]
    assert len(mass) == 1 and f"({recipe} recipe, before->after)" in mass[0], lines
    if recipe == "released":
        settings = next(line for line in lines if line.startswith("settings:"))
        assert "sampled at temperature 0.8, top-p 0.9 (the recipe's)" in settings
        assert "steered steps after the first at temperature 0.8" in settings
    lines = text(capsys, saved, "--recipe", recipe, "--verdict", "none")
    steering = [line for line in lines if line.startswith("steering:")]
    assert steering == [f"steering: none: the answer was not steered (verdict none; {recipe} recipe)"], lines
