"""SafeCoDeLogitsProcessor: the modulation as a Hugging Face LogitsProcessor."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

from safecode_kernels import safecode_step
from safecode_kernels.decoding import SafeCoDeDecoder, SafeCoDeLogitsProcessor, get_adapter
from safecode_kernels.decoding.noise import noised_views
from safecode_kernels.decoding.requests import build_prompt
from safecode_kernels.refusal import RefusalVocabulary
from safecode_kernels.testing.tiny_models import BACKEND, PARAMS, batch


def test_modulates_the_first_steps_only():
    torch.manual_seed(0)
    real, noised = torch.randn(2, 50), torch.randn(2, 50)
    refusal = RefusalVocabulary([1, 5, 7])
    proc = SafeCoDeLogitsProcessor(["unsafe", "safe"], refusal, PARAMS, steer_steps=2, backend=BACKEND)
    want = safecode_step(real, noised, ["unsafe", "safe"], refusal, PARAMS, backend=BACKEND, return_logits=True).logits
    ids = torch.zeros(2, 3, dtype=torch.long)
    for _ in range(2):
        proc.set_noised_logits(noised)
        torch.testing.assert_close(proc(ids, real), want)
    assert proc(ids, real) is real  # step 3: unchanged
    proc.reset()
    with pytest.raises(ValueError, match="no noised logits"):
        proc(ids, real)


def test_noised_logits_fn_and_bad_steps():
    real = torch.randn(1, 20)
    proc = SafeCoDeLogitsProcessor(
        ["none"], RefusalVocabulary([2]), steer_steps=1, noised_logits_fn=lambda ids: real.clone()
    )
    z = proc(torch.zeros(1, 1, dtype=torch.long), real)
    torch.testing.assert_close(z, real * 0.7)  # w=1, alpha=0.3, no bias for "none"
    with pytest.raises(ValueError, match="steer_steps"):
        SafeCoDeLogitsProcessor(["none"], RefusalVocabulary([2]), steer_steps=-1)


def test_in_hf_generate_matches_the_decoder(tiny):
    """``model.generate`` with the processor and a noised-branch callback gives the decoder's tokens."""
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor)
    image, prompt, verdict = images[0], prompts[0], verdicts[0]
    system = kwargs["system_prompt"][0]
    want = SafeCoDeDecoder(model, processor, PARAMS, steer_steps=3, refusal=refusal, backend=BACKEND).generate(
        [image], [prompt], [verdict], max_new_tokens=5, eos_token_id=[], system_prompt=system
    )

    adapter = get_adapter(model, processor)
    text = build_prompt(adapter, processor, prompt, system)
    real_inputs = processor(images=[image], text=[text], return_tensors="pt")
    noised_inputs = processor(images=noised_views([image], 0.1, 0), text=[text], return_tensors="pt")
    noised_vision = adapter.vision_inputs(noised_inputs)
    proc = SafeCoDeLogitsProcessor(
        [verdict],
        refusal,
        PARAMS,
        steer_steps=3,
        backend=BACKEND,
        noised_logits_fn=lambda ids: adapter.full_forward(ids, noised_vision),
    )
    out = model.generate(
        **real_inputs,
        logits_processor=LogitsProcessorList([proc]),
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
        eos_token_id=None,
        suppress_tokens=adapter.placeholder_ids,
    )
    assert out[0, real_inputs["input_ids"].shape[1] :].tolist() == want.sequences[0]
