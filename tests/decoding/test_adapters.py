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
    adapter.select_rows(torch.tensor([0, 2]))
    assert model.model.rope_deltas.tolist() == [[1], [3]]
