"""Adapter selection and the per-family quirks."""

from __future__ import annotations

import types

import pytest
import torch
import transformers

from safecode_kernels.decoding import SafeCoDeDecoder, adapters, get_adapter, supported_models
from safecode_kernels.decoding.requests import prepare
from safecode_kernels.testing.tiny_models import batch, tiny_qwen2_vl

ADAPTER_OF = {
    "llava": "LlavaAdapter",
    "llava_next": "LlavaNextAdapter",
    "qwen2_vl": "Qwen2VLAdapter",
    "qwen2_5_vl": "Qwen2VLAdapter",
    "qwen3_vl": "Qwen2VLAdapter",
    "instructblip": "InstructBlipAdapter",
    "idefics2": "IdeficsAdapter",
    "idefics3": "IdeficsAdapter",
}


def test_family_adapters(tiny, family):
    model, processor, _ = tiny
    adapter = get_adapter(model, processor)
    assert type(adapter) is getattr(adapters, ADAPTER_OF[family])
    assert adapter.image_token_id in adapter.placeholder_ids
    assert adapter.cache_kwarg in ("cache", "past_key_values")


def test_unsupported_model_names_the_supported_ones():
    fake = types.SimpleNamespace(config=types.SimpleNamespace(model_type="idefics9"), lm_head=object())
    with pytest.raises(ValueError, match="unsupported model SimpleNamespace .*'idefics9'.*: LlavaForCond"):
        SafeCoDeDecoder(fake, processor=None)
    assert "Qwen2_5_VLForConditionalGeneration" in supported_models()


def test_model_without_lm_head(tiny):
    """The family's headless ``*Model`` (same config, no LM head) is refused."""
    model, processor, _ = tiny
    headless = getattr(transformers, type(model).__name__.replace("ForConditionalGeneration", "Model"))
    with pytest.raises(ValueError, match="no language-model head"):
        get_adapter(headless(model.config), processor)


def test_positions_skip_padding_and_gaps(tiny):
    """A row's positions with padding (and a gap) equal those of its unpadded prompt."""
    model, processor, _ = tiny
    adapter = get_adapter(model, processor)
    images, prompts, verdicts, kwargs = batch(processor)
    setup = prepare(
        model, processor, images[:1], prompts[:1], verdicts[:1], refusal=[1], system_prompt=kwargs["system_prompt"][0]
    )
    request = setup.requests[0]
    ids, p = request.input_ids[None], request.prefix_len
    plain, plain_next = adapter.prompt_positions(ids, torch.ones_like(ids), request.real)
    pad = torch.zeros(1, 3, dtype=torch.long)
    gapped = torch.cat([pad, ids[:, :p], pad, ids[:, p:]], dim=1)
    mask = torch.cat([pad, torch.ones(1, p), pad, torch.ones(1, ids.shape[1] - p)], dim=1).long()
    positions, next_position = adapter.prompt_positions(gapped, mask, request.real)
    keep = mask[0].bool()
    assert torch.equal(positions[..., keep], plain)
    assert torch.equal(next_position, plain_next)


def test_qwen_rope_deltas_follow_the_rows():
    model, processor = tiny_qwen2_vl()
    adapter = get_adapter(model, processor)
    model.model.rope_deltas = torch.tensor([[1], [2], [3], [4]])
    adapter.select_rows(torch.tensor([0, 2]), 4)
    assert model.model.rope_deltas.tolist() == [[1], [3]]
    # Deltas set for another batch (a model call outside the decoder's) are left alone.
    adapter.select_rows(torch.tensor([1]), 3)
    assert model.model.rope_deltas.tolist() == [[1], [3]]


END_OF_TURN = {"qwen2_vl": "<|im_end|>", "qwen3_vl": "<|im_end|>", "idefics2": "<end_of_utterance>"}
END_OF_TURN.update(idefics3="<end_of_utterance>", llava="<|im_end|>", llava_next="<|im_end|>")


@pytest.mark.parametrize("family", sorted(END_OF_TURN))
def test_answers_stop_at_the_family_end_of_turn_token(family):
    """With a generation config that names only the tokenizer's EOS, an answer still ends at
    the family's end-of-turn token (made the best token at step 2 by a hook on the LM head)."""
    from safecode_kernels.testing.tiny_models import BACKEND, BUILDERS

    model, processor = BUILDERS[family]()
    end = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN[family])
    images, prompts, verdicts, _ = batch(processor)
    calls = []

    def end_the_turn_at_step_2(module, args, output):
        calls.append(1)
        if len(calls) == 3:  # the prefill, step 1, step 2
            output = output.clone()
            output[..., end] = 1e4
        return output

    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id  # no end-of-turn token
    handle = model.get_output_embeddings().register_forward_hook(end_the_turn_at_step_2)
    try:
        decoder = SafeCoDeDecoder(model, processor, steer_steps=1, backend=BACKEND, prefill_chunk_tokens=0)
        result = decoder.generate(images[:1], prompts[:1], verdicts[:1], max_new_tokens=6)
    finally:
        handle.remove()
        model.generation_config.eos_token_id = saved
    assert end != processor.tokenizer.eos_token_id
    assert len(result.sequences[0]) == 3 and result.sequences[0][-1] == end
    # The caller's explicit eos_token_id is taken as given.
    assert end not in prepare(model, processor, images[:1], prompts[:1], verdicts[:1], eos_token_id=[2]).eos_ids


def test_no_end_of_turn_token_outside_the_vocabulary(tiny, family):
    model, processor, _ = tiny
    adapter = get_adapter(model, processor)
    ids = adapter.end_of_turn_ids(processor.tokenizer)
    assert all(processor.tokenizer.convert_ids_to_tokens(i) in adapter.end_of_turn_tokens for i in ids)
    if family == "instructblip":  # Vicuna: the EOS </s> ends the turn
        assert ids == frozenset()


def test_a_tokenizer_is_not_a_processor():
    """The model's tokenizer (or image processor) given as the processor fails at once, naming
    what is missing, instead of deep inside the first generate."""
    model, processor = tiny_qwen2_vl()
    for wrong, missing in ((processor.tokenizer, "image_processor"), (processor.image_processor, "tokenizer")):
        with pytest.raises(TypeError, match=f"processor must be the model's processor .*{missing}"):
            get_adapter(model, wrong)
