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
    for length in (3, 4):  # one more column per step, as in generate
        proc.set_noised_logits(noised)
        torch.testing.assert_close(proc(torch.zeros(2, length, dtype=torch.long), real), want)
    assert proc(torch.zeros(2, 5, dtype=torch.long), real) is real  # step 3: unchanged
    proc.reset()
    with pytest.raises(ValueError, match="no noised logits"):
        proc(torch.zeros(2, 6, dtype=torch.long), real)


@pytest.mark.parametrize(
    "refusal",
    [[1, 5, 7], (7, 1, 5), torch.tensor([1, 5, 7]), torch.tensor([1, 5, 7], dtype=torch.int32), "mask"],
    ids=["list", "tuple", "tensor", "int32-tensor", "mask"],
)
def test_any_refusal_form_becomes_one_vocabulary(refusal):
    """Every accepted form is converted once into a RefusalVocabulary (which keeps the set per
    device, so it follows the scores onto any device) and gives the same modulation."""
    if isinstance(refusal, str):
        refusal = torch.zeros(50, dtype=torch.bool).index_fill(0, torch.tensor([1, 5, 7]), True)
    torch.manual_seed(0)
    real, noised = torch.randn(2, 50), torch.randn(2, 50)
    proc = SafeCoDeLogitsProcessor(["unsafe", "safe"], refusal, PARAMS, steer_steps=1, backend=BACKEND)
    assert isinstance(proc.refusal, RefusalVocabulary) and proc.refusal.ids.tolist() == [1, 5, 7]
    want = safecode_step(real, noised, ["unsafe", "safe"], RefusalVocabulary([1, 5, 7]), PARAMS, backend=BACKEND)
    proc.set_noised_logits(noised)
    got = proc(torch.zeros(2, 3, dtype=torch.long), real)
    assert torch.equal(got.argmax(-1), want.tokens)
    with pytest.raises(TypeError, match="refusal must be"):
        SafeCoDeLogitsProcessor(["unsafe"], "I'm sorry")


def test_a_new_generation_is_recognised_from_its_inputs():
    """The step count starts again whenever the inputs do not continue the last call's: other
    rows, a length that is not one more, or other prompt columns (even one column longer)."""
    torch.manual_seed(0)
    real, noised = torch.randn(2, 50), torch.randn(2, 50)
    refusal = RefusalVocabulary([1, 5, 7])
    proc = SafeCoDeLogitsProcessor(
        ["unsafe", "safe"], refusal, PARAMS, steer_steps=1, backend=BACKEND, noised_logits_fn=lambda ids: noised
    )
    want = safecode_step(real, noised, ["unsafe", "safe"], refusal, PARAMS, backend=BACKEND, return_logits=True).logits
    prompt = torch.arange(8).reshape(2, 4)
    torch.testing.assert_close(proc(prompt, real), want)  # step 0 of the first generation
    assert proc(torch.cat([prompt, prompt[:, :1]], 1), real) is real  # its step 1
    # The same prompt again (generate called a second time): steered again.
    torch.testing.assert_close(proc(prompt, real), want)
    assert proc(torch.cat([prompt, prompt[:, :1]], 1), real) is real
    # A new prompt exactly one column longer than the last call's input: a new generation too.
    torch.testing.assert_close(proc(torch.arange(100, 112).reshape(2, 6), real), want)


def test_expanded_rows_repeat_each_verdict():
    """num_return_sequences / beams give k consecutive rows per request: each verdict is repeated."""
    torch.manual_seed(0)
    real, noised = torch.randn(6, 50), torch.randn(6, 50)
    refusal = RefusalVocabulary([1, 5, 7])
    repeated = ["unsafe"] * 3 + ["safe"] * 3
    want = safecode_step(real, noised, repeated, refusal, PARAMS, backend=BACKEND, return_logits=True).logits
    ids = torch.zeros(6, 2, dtype=torch.long)
    for verdicts in (["unsafe", "safe"], torch.tensor([1, -1], dtype=torch.int8)):
        proc = SafeCoDeLogitsProcessor(verdicts, refusal, PARAMS, steer_steps=1, backend=BACKEND)
        proc.set_noised_logits(noised)
        torch.testing.assert_close(proc(ids, real), want)
    proc = SafeCoDeLogitsProcessor(["unsafe", "safe", "none", "safe"], refusal, PARAMS, backend=BACKEND)
    proc.set_noised_logits(noised)
    with pytest.raises(ValueError, match="6 rows for 4 verdicts"):
        proc(ids, real)
    with pytest.raises(TypeError, match="one verdict per request"):
        SafeCoDeLogitsProcessor("unsafe", refusal)


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
    """``model.generate`` with the processor and a noised-branch callback gives the decoder's
    tokens, again when the same processor is reused for a second call (no ``reset``), and for
    every returned sequence of an expanded batch (``num_return_sequences``)."""
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
        # One row at a time: an expanded batch has several rows per image.
        noised_logits_fn=lambda ids: torch.cat([adapter.full_forward(row[None], noised_vision) for row in ids]),
    )
    settings = dict(max_new_tokens=5, min_new_tokens=5, eos_token_id=None, suppress_tokens=adapter.placeholder_ids)
    start = real_inputs["input_ids"].shape[1]
    for _ in range(2):  # the second call reuses the processor as it is
        out = model.generate(**real_inputs, logits_processor=LogitsProcessorList([proc]), do_sample=False, **settings)
        assert out[0, start:].tolist() == want.sequences[0]
    # Two sequences per request (sampling with top_k=1 is greedy): both rows steered by its verdict.
    out = model.generate(
        **real_inputs,
        logits_processor=LogitsProcessorList([proc]),
        do_sample=True,
        top_k=1,
        num_return_sequences=2,
        **settings,
    )
    assert [row[start:].tolist() for row in out] == [want.sequences[0]] * 2
