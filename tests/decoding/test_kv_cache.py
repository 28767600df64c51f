"""The reserved KV cache's memory: the room it reserves and grows to, the part caches that
``merge_rows`` releases on any transformers version, and the arithmetic of bytes per position
and of the CUDA prefill limit (checked on the CPU, the device's free memory monkeypatched)."""

from __future__ import annotations

import inspect
import weakref

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.cache_utils import DynamicLayer

from safecode_kernels.decoding import decoder as decoder_module
from safecode_kernels.decoding.adapters import get_adapter
from safecode_kernels.decoding.kv_cache import (
    MEMORY_FRACTION,
    PREFILL_HEADROOM,
    cache_nbytes,
    free_device_bytes,
    kv_bytes_per_position,
    merge_rows,
    prefill_bytes_per_token,
    prefill_tokens_from_free_memory,
    reserved_cache,
    set_capacity,
)


def _kv(rows, length, seed, heads=2, dim=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, heads, length, dim, generator=g), torch.randn(rows, heads, length, dim, generator=g)


def _zeroing_reset(self) -> None:
    """``DynamicLayer.reset`` as transformers 5.17 has it: the tensors are zeroed, not dropped."""
    if self.is_initialized:
        self.keys.zero_()
        self.values.zero_()


def _tensors_of(layer) -> list[torch.Tensor]:
    held = []
    for value in vars(layer).values():
        items = value if isinstance(value, (tuple, list)) else (value,)
        held += [item for item in items if isinstance(item, torch.Tensor)]
    return held


# ----- merge_rows releases the part caches ---------------------------------------------------


@pytest.mark.parametrize("reset", ["drops", "zeroes (transformers 5.17)"])
def test_merge_rows_frees_the_parts(tiny, monkeypatch, reset):
    if reset != "drops":
        monkeypatch.setattr(DynamicLayer, "reset", _zeroing_reset)
    model = tiny[0]
    parts = [reserved_cache(model, capacity=10) for _ in range(3)]
    for seed, part in enumerate(parts):
        part.update(*_kv(seed + 1, 7, seed), 0)
    buffers = [weakref.ref(t) for part in parts for t in part.layers[0]._buffers]
    merged = merge_rows(model, parts, capacity=10)
    assert merged.layers[0].keys.shape[0] == 6
    assert all(ref() is None for ref in buffers)  # the storages are gone, not zeroed
    for part in parts:
        assert all(_tensors_of(layer) == [] for layer in part.layers)
        assert part.get_seq_length() == 0


# ----- the room reserved, and raised when the noised rows leave ------------------------------


def test_raised_capacity_moves_the_kept_rows(tiny):
    model = tiny[0]
    plain, reserved = DynamicCache(config=model.config), reserved_cache(model, capacity=12)
    set_capacity(reserved, 6)  # the two-branch phase: room for 6 positions only
    for cache in (plain, reserved):
        cache.update(*_kv(4, 5, 0), 0)
    assert reserved.layers[0]._buffers[0].shape == (4, 2, 6, 4)
    old = weakref.ref(reserved.layers[0]._buffers[0])
    set_capacity(reserved, 12)
    index = torch.tensor([0, 2])
    for cache in (plain, reserved):
        cache.batch_select_indices(index)
    assert old() is None
    buffer = reserved.layers[0]._buffers[0]
    assert buffer.shape == (2, 2, 12, 4) and reserved.layers[0].capacity == 12
    for step in range(7):  # fills the new room in place
        a, b = plain.update(*_kv(2, 1, 1 + step), 0), reserved.update(*_kv(2, 1, 1 + step), 0)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert reserved.layers[0]._buffers[0] is buffer
    assert cache_nbytes(reserved) == 2 * buffer.untyped_storage().nbytes()


def test_a_lower_capacity_keeps_the_room(tiny):
    reserved = reserved_cache(tiny[0], capacity=12)
    reserved.update(*_kv(2, 5, 0), 0)
    set_capacity(reserved, 6)
    reserved.batch_select_indices(torch.tensor([1]))
    assert reserved.layers[0]._buffers[0].shape == (1, 2, 12, 4)


# ----- bytes per position ---------------------------------------------------------------------


def _gqa_llava():
    """A tiny LLaVA whose language model has 4 query heads and 1 KV head of 16 dimensions."""
    text = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
    )
    vision = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1)
    vision.update(num_attention_heads=2, image_size=28, patch_size=14)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(LlavaConfig(text_config=text.to_dict(), vision_config=vision)).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_per_position_is_what_the_cache_holds(dtype):
    model = _gqa_llava().to(dtype)
    assert kv_bytes_per_position(model.config, dtype) == 2 * 3 * 1 * 16 * dtype.itemsize
    cache = reserved_cache(model, capacity=20)
    with torch.inference_mode():
        # transformers renamed past_key_values to cache; the floor version takes the old name.
        kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        model(input_ids=torch.randint(1, 60, (3, 9)), use_cache=True, **{kwarg: cache})
    assert cache.get_seq_length() == 9
    assert cache_nbytes(cache) == 3 * 20 * kv_bytes_per_position(model.config, dtype)


def test_kv_bytes_per_position_of_every_family(tiny):
    """Against a forward's cache on every tiny family (text only, full-attention layers)."""
    model, processor, _ = tiny
    adapter = get_adapter(model, processor)
    cache = reserved_cache(model, capacity=16)
    ids = processor.tokenizer(["a short text"], return_tensors="pt").input_ids
    with torch.inference_mode():
        adapter.text_model(input_ids=ids, use_cache=True, **{adapter.cache_kwarg: cache})
    assert cache_nbytes(cache) == 16 * kv_bytes_per_position(model.config, model.dtype)


# ----- the CUDA prefill limit -----------------------------------------------------------------


def test_prefill_bytes_per_token():
    config = _gqa_llava().config
    # 5 hidden widths, queries + keys + values, 3 MLP widths; fp32 scores of 4 heads x 100 columns
    width = 5 * 32 + (4 + 2) * 16 + 3 * 48
    assert prefill_bytes_per_token(config, torch.bfloat16, 100) == width * 2 + 4 * 100 * 4


def test_prefill_tokens_from_free_memory():
    config, dtype = _gqa_llava().config, torch.bfloat16
    per_token = PREFILL_HEADROOM * prefill_bytes_per_token(config, dtype, 50)
    position = kv_bytes_per_position(config, dtype)
    free = 10_000_000
    expected = (int(free * MEMORY_FRACTION) - 1000 * position) // per_token
    assert expected > 1
    assert prefill_tokens_from_free_memory(config, dtype, free, 1000, 50) == expected
    # The whole cache alone fills the memory: one request per chunk, the least there is.
    assert prefill_tokens_from_free_memory(config, dtype, free, free // position, 50) == 1


def test_free_device_bytes(monkeypatch):
    device = torch.device("cuda", 1)
    seen = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: seen.append(d) or (5_000, 80_000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d: 3_000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: 1_000)
    assert free_device_bytes(device) == 5_000 + 2_000 and seen == [device]


def test_cuda_prefill_limit_comes_from_free_memory(monkeypatch):
    model = _gqa_llava().to(torch.bfloat16)
    monkeypatch.setattr(decoder_module, "free_device_bytes", lambda device: 4_000_000)
    limit = decoder_module._prefill_limit(None, "cuda:0", model, 600, 30)
    assert limit == prefill_tokens_from_free_memory(model.config, torch.bfloat16, 4_000_000, 600, 30)
    assert decoder_module._requests_per_chunk(limit, 8, 2, 30, torch.device("cuda", 0)) == min(8, limit // 60)
    # An explicit limit, and the other devices, keep their own rules.
    assert decoder_module._prefill_limit(0, "cuda:0", model, 600, 30) == 0
    assert decoder_module._prefill_limit(None, "cpu", model, 600, 30) is None
    assert decoder_module._prefill_limit(None, "meta", model, 600, 30) is None
