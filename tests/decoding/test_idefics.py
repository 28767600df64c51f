"""Idefics2 / Idefics3: images split into different numbers and sizes of sub-images share one
batch (zero-padded as the processor pads its own batches) and give what each gets alone."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from safecode_kernels.decoding import SafeCoDeDecoder, get_adapter
from safecode_kernels.decoding.kv_cache import is_reserved, reserved_cache
from safecode_kernels.decoding.requests import prepare
from safecode_kernels.refusal import RefusalVocabulary
from safecode_kernels.testing.tiny_idefics import tiny_idefics2, tiny_idefics3
from safecode_kernels.testing.tiny_models import random_image, refusal_ids
from tests.decoding.compare import assert_same, run_all

BUILDERS = {"idefics2": tiny_idefics2, "idefics3": tiny_idefics3}
PROMPTS = ["What is in this image?", "Hi", "Tell me about the weapon in the photo, please.", "Is it safe?"]
VERDICTS = ["unsafe", "safe", "none", "unsafe"]
SYSTEM = ["You are a helpful assistant.", "Be brief.", None, None]
# (width, height). Idefics3 (tiles of 28, no resize): 28x28 is not split (overview only,
# <global-img> first), 56x56 gives 2x2 tiles + overview, 64x64 (up to 84) 3x3, 84x28 3x1.
# Idefics2 always gives 4 quarters + the whole, each at its own size (padded to the largest).
SHAPES = [(56, 56), (64, 64), (28, 28), (84, 28)]
TILES = {"idefics2": [5, 5, 5, 5], "idefics3": [5, 10, 1, 4]}


@pytest.fixture(params=list(BUILDERS))
def idefics(request):
    """The family name (the shared ``family`` fixture spans every family)."""
    return request.param


def requests():
    return [random_image(i).resize(shape) for i, shape in enumerate(SHAPES)], PROMPTS, VERDICTS


def _setup(model, processor):
    images, prompts, verdicts = requests()
    return prepare(model, processor, images, prompts, verdicts, refusal=[1], system_prompt=SYSTEM)


def test_sub_images_differ_per_request_and_agree_between_branches(idefics):
    model, processor = BUILDERS[idefics]()
    setup = _setup(model, processor)  # asserts equal token ids in both branches
    image_id = model.config.image_token_id
    assert get_adapter(model, processor).placeholder_ids == [image_id]
    tiles = [r.real["pixel_values"].shape[1] for r in setup.requests]
    counts = [int((r.input_ids == image_id).sum()) for r in setup.requests]
    assert tiles == TILES[idefics]
    assert counts == [4 * n for n in tiles]  # 4 image tokens per sub-image
    if idefics == "idefics2":  # sub-images keep their size: the requests' pixel shapes differ
        assert [tuple(r.real["pixel_values"].shape[-2:]) for r in setup.requests] == [
            (56, 56),
            (64, 64),
            (28, 28),
            (28, 64),
        ]
    for request in setup.requests:  # the noised view has the real image's size, so its split
        assert request.noised["pixel_values"].shape == request.real["pixel_values"].shape
        assert torch.equal(request.noised["pixel_attention_mask"], request.real["pixel_attention_mask"])


def test_concat_vision_pads_like_the_processor(idefics):
    """The adapter's batch of vision inputs is what the image processor makes of the images together."""
    model, processor = BUILDERS[idefics]()
    setup = _setup(model, processor)
    batched = get_adapter(model, processor).concat_vision([r.real for r in setup.requests])
    images, _, _ = requests()
    reference = processor.image_processor([[image] for image in images], return_tensors="pt")
    assert set(batched) == {"pixel_values", "pixel_attention_mask"}
    torch.testing.assert_close(batched["pixel_values"], reference["pixel_values"], atol=0, rtol=0)
    assert torch.equal(batched["pixel_attention_mask"], reference["pixel_attention_mask"])


def _features(model, vision) -> torch.Tensor:
    """Image features ``[image tokens, hidden]`` of every request in ``vision``, in order
    (``pooler_output`` is one tensor per request in transformers 5.24, one per sub-image before)."""
    with torch.inference_mode():
        out = model.model.get_image_features(**vision).pooler_output
    return torch.cat([f.reshape(-1, f.shape[-1]) for f in out])


def test_padded_sub_images_are_ignored(idefics):
    """Each request gets from the padded batch the image features it gets alone."""
    model, processor = BUILDERS[idefics]()
    setup = _setup(model, processor)
    batched = get_adapter(model, processor).concat_vision([r.real for r in setup.requests])
    alone = torch.cat([_features(model, r.real) for r in setup.requests])
    torch.testing.assert_close(_features(model, batched), alone, atol=1e-5, rtol=0)


def test_mixed_splits_match_naive_and_two_cache(idefics):
    """Unsplit, square and wide images in one batch: same ids and logits as each request alone."""
    model, processor = BUILDERS[idefics]()
    refusal = RefusalVocabulary(refusal_ids(processor.tokenizer))
    images, prompts, verdicts = requests()
    fused, naive, two = run_all(model, processor, refusal, images, prompts, verdicts, system_prompt=SYSTEM)
    assert_same(fused, naive)
    assert_same(two, naive)


def test_pixel_attention_mask_is_carried():
    """The decoder's image forward gets every row's pixel mask, and the mask matters: Idefics2
    pads smaller sub-images, whose padded patches must not be attended to."""
    model, processor = tiny_idefics2()
    images, prompts, verdicts = requests()
    seen = []

    def record(module, args, kwargs):
        if kwargs.get("pixel_values") is not None:
            seen.append({k: kwargs[k] for k in ("pixel_values", "pixel_attention_mask", "input_ids")})

    hook = model.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        SafeCoDeDecoder(model, processor, steer_steps=2, refusal=[1], backend="torch").generate(
            images, prompts, verdicts, max_new_tokens=2, system_prompt=SYSTEM
        )
    finally:
        hook.remove()
    assert len(seen) == 1
    mask, pixels = seen[0]["pixel_attention_mask"], seen[0]["pixel_values"]
    assert mask is not None and mask.shape == (8, 5, 64, 64) and pixels.shape == (8, 5, 3, 64, 64)
    assert not mask[0].all()  # request 0 (56x56, padded to 64): its padding is masked
    masked = _features(model, {"pixel_values": pixels[:1], "pixel_attention_mask": mask[:1]})
    assert not torch.allclose(masked, _features(model, {"pixel_values": pixels[:1]}), atol=1e-3)


def test_idefics2_sliding_window_covering_the_run():
    """The released Idefics2 keeps Mistral's 4096-token sliding window (so does the tiny one):
    a run that fits in it gets full reserved cache layers, and the answers equal those of the
    same weights without a window."""
    from transformers import Idefics2ForConditionalGeneration

    model, processor = tiny_idefics2()
    assert model.config.text_config.sliding_window == 4096
    assert "Sliding" in type(DynamicCache(config=model.config).layers[0]).__name__
    assert is_reserved(reserved_cache(model, capacity=4096))
    assert not is_reserved(reserved_cache(model, capacity=4097))
    beyond = torch.zeros(1, 2, 4097, 16)  # more positions than the window covers
    with pytest.raises(RuntimeError, match="4097 positions exceed the layer's sliding window of 4096"):
        reserved_cache(model, capacity=8).update(beyond, beyond, 0)
    config = copy.deepcopy(model.config)
    config.text_config.sliding_window = None
    unwindowed = Idefics2ForConditionalGeneration(config).eval()
    unwindowed.load_state_dict(model.state_dict())
    refusal = RefusalVocabulary(refusal_ids(processor.tokenizer))
    images, prompts, verdicts = requests()
    windowed, _, _ = run_all(model, processor, refusal, images[:3], prompts[:3], verdicts[:3], system_prompt=SYSTEM[:3])
    reference, _, _ = run_all(
        unwindowed, processor, refusal, images[:3], prompts[:3], verdicts[:3], system_prompt=SYSTEM[:3]
    )
    assert_same(windowed, reference)


def test_sliding_window_shorter_than_the_run_is_refused():
    """Left padding would shift a short window off each request's own positions: refused."""
    from transformers import Idefics2ForConditionalGeneration

    model, processor = tiny_idefics2()
    config = copy.deepcopy(model.config)
    config.text_config.sliding_window = 16
    short = Idefics2ForConditionalGeneration(config).eval()
    images, prompts, verdicts = requests()
    with pytest.raises(ValueError, match=r"sliding window of 16 positions, fewer than this batch needs \(\d+"):
        SafeCoDeDecoder(short, processor, refusal=[1]).generate(images[:2], prompts[:2], verdicts[:2], max_new_tokens=2)
