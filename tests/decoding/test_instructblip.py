"""InstructBLIP: image tokens in front of the text, a Q-Former fed the prompt, no T5 variant."""

from __future__ import annotations

import pytest
import torch

from safecode_kernels.decoding import SafeCoDeDecoder, get_adapter
from safecode_kernels.decoding.requests import prepare
from safecode_kernels.testing.tiny_instructblip import NUM_QUERY_TOKENS, tiny_instructblip
from safecode_kernels.testing.tiny_models import BACKEND, PARAMS, batch
from tests.decoding.compare import MAX_NEW, STEER


def setup_of(prefix="shared"):
    model, processor = tiny_instructblip()
    images, prompts, verdicts, kwargs = batch(processor, prefix)
    return model, processor, prepare(model, processor, images, prompts, verdicts, refusal=[1], **kwargs)


def test_flan_t5_variant_is_refused():
    model, processor = tiny_instructblip(decoder_only=False)
    with pytest.raises(ValueError, match=r"encoder-decoder language model \(t5.*decoder-only"):
        SafeCoDeDecoder(model, processor)


def test_prompt_with_placeholder_is_rejected():
    model, processor, _ = setup_of()
    adapter = get_adapter(model, processor)
    assert adapter.image_token == "<image>" and isinstance(adapter.image_token, str)
    images, prompts, verdicts, kwargs = batch(processor)
    prompts[1] = "<image> Hi"
    with pytest.raises(ValueError, match="prompt 1 holds the image placeholder '<image>'.*remove it"):
        SafeCoDeDecoder(model, processor, refusal=[1]).generate(images, prompts, verdicts, **kwargs)


def test_image_tokens_come_first():
    model, processor, setup = setup_of()
    image_id = model.config.image_token_id
    assert image_id == processor.tokenizer.convert_tokens_to_ids("<image>") < model.config.text_config.vocab_size
    for request in setup.requests:
        assert request.prefix_len == 0
        assert request.input_ids[:NUM_QUERY_TOKENS].tolist() == [image_id] * NUM_QUERY_TOKENS
        assert not (request.input_ids[NUM_QUERY_TOKENS:] == image_id).any()
        assert set(request.real) == {"pixel_values", "qformer_input_ids", "qformer_attention_mask"}


def test_padded_qformer_inputs_give_the_same_image_features():
    """Zero-padding the Q-Former prompts on the right changes no request's image features."""
    model, processor, setup = setup_of()
    lengths = [r.real["qformer_input_ids"].shape[1] for r in setup.requests]
    assert len(set(lengths)) == 3
    batched = get_adapter(model, processor).concat_vision([r.real for r in setup.requests])
    assert batched["qformer_input_ids"].shape == batched["qformer_attention_mask"].shape == (3, max(lengths))
    assert batched["qformer_attention_mask"].sum(1).tolist() == lengths
    with torch.inference_mode():
        together = model.get_image_features(**batched).pooler_output
        for got, request in zip(together, setup.requests):
            alone = model.get_image_features(**request.real).pooler_output[0]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


def test_one_prefill_forward_on_all_rows():
    """No text before the image: the first forward runs the whole prompt on all 6 rows, and
    only that forward goes through the Q-Former (the steps run the language model alone)."""
    model, processor = tiny_instructblip()
    images, prompts, verdicts, kwargs = batch(processor)
    embedded, qformer = [], []
    hooks = [
        model.get_input_embeddings().register_forward_hook(lambda m, a, out: embedded.append(a[0].shape)),
        model.qformer.register_forward_hook(
            lambda m, a, kw, out: qformer.append(kw["input_ids"].shape), with_kwargs=True
        ),
    ]
    try:
        result = SafeCoDeDecoder(
            model, processor, PARAMS, steer_steps=STEER, refusal=[1], backend=BACKEND, min_shared_prefix=1
        ).generate(images, prompts, verdicts, max_new_tokens=MAX_NEW, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    columns = result.stats["prompt_columns"]
    assert result.stats["prefix_columns"] == 0 and "shared_prefix_tokens" not in result.stats
    assert embedded[0] == (6, columns)
    assert [s[0] for s in qformer] == [6]
    assert embedded[1:] == [(6, 1)] * (STEER - 1) + [(3, 1)] * (MAX_NEW - STEER)


def test_forwards_without_pixels_run_the_language_model():
    """A text chunk filling the cache without logits, then the next ones: the language model's
    logits of the whole text, whichever name the installed transformers gives the cache."""
    from safecode_kernels.decoding.kv_cache import new_cache

    model, processor = tiny_instructblip()
    adapter = get_adapter(model, processor)
    ids = torch.tensor([processor.tokenizer.encode("Sure! The image shows a cat")])
    mask, positions = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
    cache = new_cache(model, capacity=ids.shape[1])
    with torch.inference_mode():
        assert adapter.forward(ids[:, :4], mask[:, :4], positions[:, :4], cache, logits=False) is None
        got = adapter.forward(ids[:, 4:], mask, positions[:, 4:], cache)
        want = model.language_model(input_ids=ids).logits[:, -1]
    assert cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
