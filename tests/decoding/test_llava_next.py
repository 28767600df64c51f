"""LLaVA-NeXT: images of different shapes take different tile and token counts in one batch."""

from __future__ import annotations

import pytest
import torch

from safecode_kernels.decoding import get_adapter
from safecode_kernels.decoding.requests import _encode, build_prompt, prepare
from safecode_kernels.refusal import RefusalVocabulary
from safecode_kernels.testing.tiny_llava_next import tiny_llava_next
from safecode_kernels.testing.tiny_models import random_image, refusal_ids
from safecode_kernels.verdict import Verdict
from tests.decoding.compare import assert_same, run_all

# Width x height: a square image takes 4 tiles + the overview, a 2:1 one 2 tiles + the overview.
SHAPES = [(56, 56), (56, 28), (28, 56)]


def requests():
    images = [random_image(i).resize(shape) for i, shape in enumerate(SHAPES)]
    prompts = ["What is in this image?", "Hi", "Tell me about the weapon in the photo, please."]
    return images, prompts, ["unsafe", "safe", "none"]


def test_tiles_differ_per_request_and_agree_between_branches():
    model, processor = tiny_llava_next()
    images, prompts, verdicts = requests()
    setup = prepare(model, processor, images, prompts, verdicts, refusal=[1])
    image_id = model.config.image_token_id
    counts = [int((r.input_ids == image_id).sum()) for r in setup.requests]
    tiles = [r.real["pixel_values"].shape[1] for r in setup.requests]
    assert len(set(counts)) == 3 and tiles == [5, 3, 3]
    for request in setup.requests:  # the noised view has the real image's size, so its tiles
        assert request.noised["pixel_values"].shape == request.real["pixel_values"].shape
        assert torch.equal(request.noised["image_sizes"], request.real["image_sizes"])


def test_branches_with_different_token_ids_are_refused():
    """The check behind the decoder's shared token ids: a noised view of another shape would
    take another number of image tokens (the public API already refuses a size mismatch)."""
    model, processor = tiny_llava_next()
    adapter = get_adapter(model, processor)
    images, prompts, _ = requests()
    text = build_prompt(adapter, processor, prompts[0])
    with pytest.raises(RuntimeError, match="request 0: the processor gave different token ids"):
        _encode(adapter, processor, 0, text, images[0], images[1], Verdict.SAFE, 4)


def test_padded_tiles_are_ignored():
    """The zero-padded batch of vision inputs gives each request the image features it gets alone."""
    model, processor = tiny_llava_next()
    images, prompts, verdicts = requests()
    setup = prepare(model, processor, images, prompts, verdicts, refusal=[1])
    adapter = get_adapter(model, processor)
    batched = adapter.concat_vision([r.real for r in setup.requests])
    assert batched["pixel_values"].shape[:2] == (3, 5)
    with torch.inference_mode():
        together = model.model.get_image_features(
            **batched, vision_feature_layer=-2, vision_feature_select_strategy="default"
        ).pooler_output
        for got, request in zip(together, setup.requests):
            alone = model.model.get_image_features(
                **request.real, vision_feature_layer=-2, vision_feature_select_strategy="default"
            ).pooler_output[0]
            torch.testing.assert_close(got, alone, atol=1e-6, rtol=0)


def test_mixed_shapes_match_naive_and_two_cache():
    model, processor = tiny_llava_next()
    refusal = RefusalVocabulary(refusal_ids(processor.tokenizer))
    images, prompts, verdicts = requests()
    fused, naive, two = run_all(
        model,
        processor,
        refusal,
        images,
        prompts,
        verdicts,
        system_prompt=["You are a helpful assistant.", "Be brief.", None],
    )
    assert_same(fused, naive)
    assert_same(two, naive)
