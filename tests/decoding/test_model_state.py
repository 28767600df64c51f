"""The decoder leaves the user's model as it found it (decoding/model_state.py)."""

from __future__ import annotations

import pytest
import torch

from safecode_kernels.decoding import SafeCoDeDecoder, get_adapter
from safecode_kernels.decoding.model_state import model_state_kept
from safecode_kernels.decoding.requests import build_prompt
from safecode_kernels.testing.tiny_models import BACKEND, PARAMS, batch


def attributes(model) -> dict:
    """Every module's plain attributes, by identity."""
    return {(name, key): id(value) for name, module in model.named_modules() for key, value in vars(module).items()}


def plain_generate(model, processor, image, prompt) -> list[int]:
    text = build_prompt(get_adapter(model, processor), processor, prompt)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("recipe", ["paper", "released"])
def test_the_model_is_left_as_found(tiny, recipe):
    """No module attribute is rebound, removed or added by a decoder run (Qwen's rope_deltas
    among them), and a plain generate afterwards gives the tokens it gave before."""
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor)
    before_tokens = plain_generate(model, processor, images[0], prompts[0])  # also HF's own lazy setup
    before = attributes(model)
    decoder = SafeCoDeDecoder(model, processor, PARAMS, steer_steps=2, refusal=refusal, backend=BACKEND, recipe=recipe)
    decoder.generate(images, prompts, verdicts, max_new_tokens=3, do_sample=False, **kwargs)
    assert attributes(model) == before
    assert plain_generate(model, processor, images[0], prompts[0]) == before_tokens


def test_the_model_is_left_as_found_when_decoding_raises(tiny):
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor)
    plain_generate(model, processor, images[0], prompts[0])
    before = attributes(model)
    calls = []

    def fail_on_the_second_step(module, args, output):
        calls.append(1)
        if len(calls) == 3:  # the prefill, the first decoding step, then this one
            raise RuntimeError("boom")

    head = model.get_output_embeddings()
    handle = head.register_forward_hook(fail_on_the_second_step)
    try:
        decoder = SafeCoDeDecoder(
            model, processor, PARAMS, steer_steps=2, refusal=refusal, backend=BACKEND, prefill_chunk_tokens=0
        )
        with pytest.raises(RuntimeError, match="boom"):
            decoder.generate(images, prompts, verdicts, max_new_tokens=5, **kwargs)
    finally:
        handle.remove()
    assert attributes(model) == before


def test_rebound_and_deleted_attributes_come_back():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model[0].note, model[0].gone = torch.zeros(1), "here"
    note = model[0].note
    with pytest.raises(KeyError), model_state_kept(model):
        model[0].note = torch.ones(1)
        del model[0].gone
        raise KeyError("any error")
    assert model[0].note is note and model[0].gone == "here"
