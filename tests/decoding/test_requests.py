"""Bad requests get clear errors before any forward pass."""

from __future__ import annotations

import pytest
import torch

from safecode_kernels.decoding import SafeCoDeDecoder, naive_safecode_generate
from safecode_kernels.testing.tiny_models import BACKEND, BUILDERS, PARAMS, batch, random_image


@pytest.fixture
def decoder(tiny):
    model, processor, refusal = tiny
    return SafeCoDeDecoder(model, processor, steer_steps=2, refusal=refusal, backend=BACKEND)


def generate(decoder, images=None, prompts=None, verdicts=None, **kwargs):
    default_images, default_prompts, default_verdicts, default_kwargs = batch(decoder.processor)
    kwargs = {**default_kwargs, "max_new_tokens": 2, **kwargs}
    return decoder.generate(
        default_images if images is None else images,
        default_prompts if prompts is None else prompts,
        default_verdicts if verdicts is None else verdicts,
        **kwargs,
    )


def test_mismatched_lengths(decoder):
    with pytest.raises(ValueError, match="3 images, 2 prompts and 3 verdicts"):
        generate(decoder, prompts=["a", "b"])
    with pytest.raises(ValueError, match="one of each per request"):
        generate(decoder, verdicts=["safe"])
    with pytest.raises(ValueError, match="2 system prompts for 3 requests"):
        generate(decoder, system_prompt=["a", "b"])
    with pytest.raises(ValueError, match="2 noised images for 3 requests"):
        generate(decoder, noised_images=[random_image(0), random_image(1)])


def test_not_lists(decoder):
    with pytest.raises(TypeError, match="prompts must be a list"):
        generate(decoder, prompts="What is this?")
    with pytest.raises(TypeError, match="images must be a list"):
        generate(decoder, images=random_image(0))
    with pytest.raises(ValueError, match="empty"):
        generate(decoder, images=[], prompts=[], verdicts=[])


def test_unknown_verdict(decoder):
    with pytest.raises(ValueError, match=r"verdicts\[1\]: unknown verdict 'maybe'"):
        generate(decoder, verdicts=["safe", "maybe", "none"])
    with pytest.raises(ValueError, match=r"verdicts\[2\]"):
        generate(decoder, verdicts=["safe", "unsafe", 7])


def test_not_images(decoder):
    with pytest.raises(TypeError, match=r"images\[1\] must be a PIL.Image.Image, got str"):
        generate(decoder, images=[random_image(0), "cat.png", random_image(2)])
    with pytest.raises(TypeError, match=r"noised_images\[0\] must be a PIL.Image.Image"):
        generate(decoder, noised_images=[None, random_image(1), random_image(2)])
    with pytest.raises(ValueError, match=r"noised_images\[0\] is \(8, 8\)"):
        generate(decoder, noised_images=[random_image(0, 8), random_image(1), random_image(2)])
    with pytest.raises(TypeError, match=r"prompts\[0\] must be a str"):
        generate(decoder, prompts=[None, "a", "b"])


def test_prompt_without_room_for_the_image(decoder):
    tok = decoder.adapter.image_token
    if not decoder.adapter.placeholder_in_prompt:  # the processor puts the image in front itself
        with pytest.raises(ValueError, match=r"prompt 1 holds the image placeholder .* remove it from the prompt"):
            generate(decoder, prompts=["a", f"{tok} b", "c"])
        with pytest.raises(ValueError, match=r"request 0: the prompt takes \d+ tokens with the image .* no room"):
            generate(decoder, max_new_tokens=1000)
        return
    with pytest.raises(ValueError, match=r"prompt 1 must hold the image placeholder .* exactly once, found 0"):
        generate(decoder, prompts=[f"{tok} a", "no image here", f"{tok} c"], chat_template=False)
    with pytest.raises(ValueError, match=r"prompt 0 .* found 2"):
        generate(decoder, prompts=[f"{tok} a {tok}", f"{tok} b", f"{tok} c"], chat_template=False)
    with pytest.raises(ValueError, match=r"prompt 2 .* found 2 \(the chat template places it"):
        generate(decoder, prompts=["a", "b", f"look: {tok}"])
    with pytest.raises(ValueError, match=r"request 0: the prompt takes \d+ tokens with the image .* no room"):
        generate(decoder, max_new_tokens=1000)


def test_bad_settings(decoder):
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(decoder, max_new_tokens=0)
    with pytest.raises(TypeError, match="max_new_tokens_unsafe must be an int"):
        generate(decoder, max_new_tokens_unsafe=2.5)
    with pytest.raises(ValueError, match="temperature > 0"):
        generate(decoder, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="steer_steps must be >= 0"):
        SafeCoDeDecoder(decoder.model, decoder.processor, steer_steps=-1)
    with pytest.raises(ValueError, match="noise std"):
        SafeCoDeDecoder(decoder.model, decoder.processor, noise_std=-0.1)
    with pytest.raises(TypeError, match="params must be a SteeringParams"):
        SafeCoDeDecoder(decoder.model, decoder.processor, params={"alpha": 1.0})


@pytest.mark.parametrize(
    "sampling, message",
    [
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be finite"),
        (dict(top_p=1.5), "top_p must be <= 1"),
        (dict(top_k=-1), "top_k must be >= 0"),
    ],
)
def test_sampling_settings_are_checked_on_a_greedy_run_too(decoder, sampling, message):
    """What SteeringParams (and the command line) reject is rejected whether or not the run samples."""
    with pytest.raises(ValueError, match=message):
        generate(decoder, **sampling)


def test_naive_loop_checks_the_same(tiny):
    model, processor, refusal = tiny
    images, prompts, verdicts, _ = batch(processor)
    with pytest.raises(ValueError, match="unknown verdict"):
        naive_safecode_generate(model, processor, images, prompts, ["bad"] * 3, refusal=refusal)


def test_prompt_layout_options():
    """The instruction in the user's turn and the text before the image (the released code's
    layout) against the chat template rendered by hand."""
    from safecode_kernels.decoding.requests import build_prompt
    from safecode_kernels.testing.tiny_models import tiny_llava

    model, processor = tiny_llava()
    decoder = SafeCoDeDecoder(model, processor)

    def template(content):
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )

    image = {"type": "image"}
    text = build_prompt(decoder.adapter, processor, "Hi", "Be kind.", system_prompt_role="user")
    assert text == template([image, {"type": "text", "text": "Be kind. Hi"}])
    text = build_prompt(decoder.adapter, processor, "Hi", "Query: ", system_prompt_role="user", text_before_image=True)
    assert text == template([{"type": "text", "text": "Query: Hi"}, image])
    with pytest.raises(ValueError, match="system_prompt_role must be 'system' or 'user'"):
        generate(decoder, system_prompt_role="assistant")


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_any_image_mode_answers_as_its_rgb_conversion(family, mode):
    """The noise and the processor see the RGB image: a grayscale (or palette, alpha, CMYK,
    16-bit) image gives the answer, and the very logits, of the same image converted to RGB."""
    model, processor = BUILDERS[family]()
    image = random_image(3)
    image = image.convert("L").convert("I;16") if mode == "I;16" else image.convert(mode)
    decoder = SafeCoDeDecoder(model, processor, PARAMS, steer_steps=2, backend=BACKEND)
    runs = [
        decoder.generate([im], ["What is this?"], ["safe"], max_new_tokens=3, return_logits=True)
        for im in (image, image.convert("RGB"))
    ]
    assert runs[0].sequences == runs[1].sequences
    for got, want in zip(runs[0].noised_logits + runs[0].logits, runs[1].noised_logits + runs[1].logits):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
