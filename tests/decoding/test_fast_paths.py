"""The decoder's speed paths give the same answers as the plain ones: the reserved KV cache,
chunked prefill, the prefix-sharing threshold, the small-batch linear path and the greedy
shortcut of unsteered steps."""

from __future__ import annotations

import weakref

import pytest
import torch
from transformers import DynamicCache

from safecode_kernels.decoding import SafeCoDeDecoder, naive_safecode_generate
from safecode_kernels.decoding.decoder import CPU_PREFILL_TOKENS, _requests_per_chunk
from safecode_kernels.decoding.kv_cache import is_reserved, kv_bytes_per_position, merge_rows, reserved_cache
from safecode_kernels.decoding.requests import prepare
from safecode_kernels.decoding.small_batch import small_batch_linear
from safecode_kernels.ops.step_inputs import StepError
from safecode_kernels.testing.tiny_models import BACKEND, PARAMS, batch, has_text_prefix
from tests.decoding.compare import MAX_NEW, STEER, assert_same


def _settings(refusal, **extra):
    return dict(params=PARAMS, steer_steps=STEER, refusal=refusal, backend=BACKEND, **extra)


# ----- reserved KV cache ------------------------------------------------------------------


def _kv(rows, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 2, length, 4, generator=g), torch.randn(rows, 2, length, 4, generator=g)


def test_reserved_cache_matches_dynamic_cache(tiny):
    model = tiny[0]
    plain, reserved = DynamicCache(config=model.config), reserved_cache(model, capacity=12)
    assert is_reserved(reserved)
    layers = len(reserved.layers)

    def update(kv):
        for i in range(layers):
            a = plain.update(*kv, i)
            b = reserved.update(*kv, i)
            for x, y in zip(a, b):
                assert torch.equal(x, y)

    update(_kv(1, 5, 0))  # a prefix
    reserved.batch_repeat_interleave(2)
    plain.batch_repeat_interleave(2)
    update(_kv(2, 4, 1))  # a suffix
    buffer = reserved.layers[0]._buffers[0]
    update(_kv(2, 1, 2))  # a step: written in place, no new buffer
    assert reserved.layers[0]._buffers[0] is buffer
    old = weakref.ref(buffer)
    del buffer
    index = torch.tensor([1])
    reserved.batch_select_indices(index)
    plain.batch_select_indices(index)
    assert old() is None  # the two-row buffer is gone at once
    for step in range(5):  # past the capacity of 12: grows and stays equal
        update(_kv(1, 1, 3 + step))
    assert reserved.get_seq_length() == plain.get_seq_length() == 15
    for a, b in zip(plain.layers, reserved.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_reserved_cache_after_outside_changes(tiny):
    """Tensors replaced from outside (here ``crop``) are taken over at the next update."""
    model = tiny[0]
    plain, reserved = DynamicCache(config=model.config), reserved_cache(model, capacity=8)
    for cache in (plain, reserved):
        cache.update(*_kv(2, 6, 0), 0)
        cache.layers[0].crop(-2)  # only layer 0 holds anything (transformers 5.17 fails on empty layers)
        keys, values = cache.update(*_kv(2, 1, 1), 0)
    assert torch.equal(plain.layers[0].keys, keys) and torch.equal(plain.layers[0].values, values)


def test_merge_rows(tiny):
    model = tiny[0]
    parts = [reserved_cache(model, capacity=10) for _ in range(3)]
    whole = DynamicCache(config=model.config)
    kvs = [_kv(rows, 7, seed) for seed, rows in enumerate((2, 1, 3))]
    for part, kv in zip(parts, kvs):
        part.update(*kv, 0)
    whole.update(torch.cat([k for k, _ in kvs]), torch.cat([v for _, v in kvs]), 0)
    merged = merge_rows(model, parts, capacity=10)
    assert torch.equal(merged.layers[0].keys, whole.layers[0].keys)
    assert torch.equal(merged.layers[0].values, whole.layers[0].values)
    step = _kv(6, 1, 9)
    a, b = merged.update(*step, 0), whole.update(*step, 0)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_noised_rows_are_freed_from_the_reserved_cache(tiny):
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor)
    result = SafeCoDeDecoder(model, processor, **_settings(refusal)).generate(
        images, prompts, verdicts, max_new_tokens=MAX_NEW, **kwargs
    )
    # Both branches reserve the steered steps only; the real rows get their whole room at the drop.
    position = kv_bytes_per_position(model.config, model.dtype) * len(prompts)
    columns = result.stats["prompt_columns"]
    assert result.stats["cache_bytes_two_branch"] == 2 * position * (columns + STEER)
    assert result.stats["cache_bytes_after_drop"] == position * (columns + MAX_NEW)


# ----- chunked prefill and the prefix threshold ----------------------------------------------


@pytest.mark.parametrize("prefix", ["shared", "none", "mixed"])
@pytest.mark.parametrize("per_chunk", [1, 2])
def test_chunked_prefill_matches_naive(tiny, prefix, per_chunk):
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor, prefix)
    kwargs = dict(max_new_tokens=MAX_NEW, return_logits=True, **kwargs)
    decoder = SafeCoDeDecoder(model, processor, **_settings(refusal, min_shared_prefix=1))
    columns = decoder.generate(images, prompts, verdicts, **kwargs).stats["prompt_columns"]
    decoder.prefill_chunk_tokens = per_chunk * 2 * columns  # whole requests of 2 rows each
    fused = decoder.generate(images, prompts, verdicts, **kwargs)
    naive = naive_safecode_generate(model, processor, images, prompts, verdicts, **_settings(refusal), **kwargs)
    assert_same(fused, naive)
    assert fused.stats["prefill_chunks"] == (3 if per_chunk == 1 else 2)
    assert (fused.stats["prefix_columns"] > 0) == has_text_prefix(processor, prefix)


def test_requests_per_chunk():
    cpu, gpu = torch.device("cpu"), torch.device("meta")
    # Default on the CPU: whole requests within CPU_PREFILL_TOKENS; elsewhere: no limit.
    assert _requests_per_chunk(None, 8, 2, 613, cpu) == 1
    assert _requests_per_chunk(None, 16, 2, 100, cpu) == CPU_PREFILL_TOKENS // 200
    assert _requests_per_chunk(None, 8, 2, 613, gpu) == 8
    assert _requests_per_chunk(0, 8, 2, 613, cpu) == 8
    assert _requests_per_chunk(1, 8, 2, 613, cpu) == 1  # at least one request
    assert _requests_per_chunk(10_000, 3, 1, 100, cpu) == 3


def test_short_prefixes_are_not_shared(tiny):
    model, processor, refusal = tiny
    if not has_text_prefix(processor, "shared"):
        pytest.skip("this family's prompts start with the image: no text prefix to share")
    images, prompts, verdicts, kwargs = batch(processor)
    setup = prepare(model, processor, images, prompts, verdicts, refusal=refusal, **kwargs)
    total = sum(r.prefix_len for r in setup.requests)
    assert 0 < total
    run = lambda **extra: SafeCoDeDecoder(model, processor, **_settings(refusal, **extra)).generate(  # noqa: E731
        images, prompts, verdicts, max_new_tokens=MAX_NEW, return_logits=True, **kwargs
    )
    below, at = run(min_shared_prefix=total + 1), run(min_shared_prefix=total)
    assert below.stats["prefix_columns"] == 0 and at.stats["prefix_columns"] > 0
    assert below.stats["forward_calls"] == at.stats["forward_calls"] - 1
    assert_same(below, at)


# ----- small-batch linear -------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_small_batch_linear_equals_linear(bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 80, bias=bias)
    model = torch.nn.Sequential(layer)
    model.get_output_embeddings = lambda: layer
    inputs = [torch.randn(rows, 1, 48) for rows in (1, 2, 3, 5, 8, 9, 16)] + [torch.randn(2, 3, 48)]
    expected = [layer(x) for x in inputs]
    with small_batch_linear(model) as patched:
        assert patched == 1 and "forward" in layer.__dict__
        got = [layer(x) for x in inputs]
    assert "forward" not in layer.__dict__
    for a, b in zip(got, expected):
        assert a.shape == b.shape and a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError), small_batch_linear(model):
        raise RuntimeError("boom")
    assert "forward" not in layer.__dict__  # restored after an error too


def test_small_batch_linear_leaves_hooked_and_other_modules_alone():
    layer, hooked = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    hooked.forward = hooked.forward  # an instance-level forward, as accelerate's hooks install
    own = hooked.__dict__["forward"]
    model = torch.nn.Sequential(layer, hooked)
    model.get_output_embeddings = lambda: layer
    with small_batch_linear(model) as patched:
        assert patched == 1 and hooked.__dict__["forward"] is own
    assert hooked.__dict__["forward"] is own
    half = torch.nn.Sequential(torch.nn.Linear(8, 8).to(torch.bfloat16))
    half.get_output_embeddings = lambda: half[0]
    with small_batch_linear(half) as patched:
        assert patched == 0
    with small_batch_linear(model, enabled=False) as patched:
        assert patched == 0


def test_small_batch_switch_gives_the_same_answers(tiny):
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor)
    kwargs = dict(max_new_tokens=MAX_NEW, return_logits=True, **kwargs)
    on = SafeCoDeDecoder(model, processor, **_settings(refusal)).generate(images, prompts, verdicts, **kwargs)
    off = SafeCoDeDecoder(model, processor, **_settings(refusal), small_batch=False).generate(
        images, prompts, verdicts, **kwargs
    )
    assert_same(on, off, atol=1e-5)


# ----- the greedy shortcut ------------------------------------------------------------------


def test_greedy_shortcut_matches_the_step_op_and_keeps_its_errors(tiny):
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor)
    setup = prepare(model, processor, images, prompts, verdicts, refusal=refusal, backend=BACKEND, **kwargs)
    vocab = model.config.get_text_config().vocab_size
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    logits[1, :] = 0.0  # all tied: the lowest allowed index wins
    banned = setup.banned_ids
    logits[2, banned] = 100.0  # the best tokens are placeholders: never chosen
    shortcut = setup.choose(logits.clone())
    reference = logits.clone()
    reference[:, banned] = float("-inf")
    assert shortcut.tolist() == reference.argmax(-1).tolist()
    assert int(shortcut[1]) == min(set(range(vocab)) - set(banned.tolist()))
    in_place = logits.clone()
    assert setup.choose(in_place, in_place=True).tolist() == shortcut.tolist()
    assert torch.isinf(in_place[:, banned]).all()
    for bad, message in ((float("nan"), "NaN"), (float("inf"), "NaN or \\+inf")):
        rows = logits.clone()
        rows[3, 7] = bad
        with pytest.raises(StepError, match=message):
            setup.choose(rows)
    rows = torch.full((1, vocab), float("-inf"))
    with pytest.raises(StepError, match="banned"):
        setup.choose(rows)
