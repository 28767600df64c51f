"""A ``DynamicCache`` whose layers write new tokens into reserved room instead of re-allocating.

Hugging Face's ``DynamicLayer.update`` appends by ``torch.cat``: every decoding step copies
the whole cache of every layer into a new tensor (for the benchmark LLaVA with a 900-token
prompt at 16 rows, 29 MB per layer per step, more than the attention itself reads). The
decoder knows how long every row can grow, so its layers allocate that room once and write
each step's keys and values into it; what the model sees is a view of the filled part, with
the shapes and values ``DynamicLayer`` would give.

The row operations the decoder uses (``batch_repeat_interleave`` after the shared prefix,
``batch_select_indices`` when rows are dropped) keep the room and free the old buffers at
once; a row selection after :func:`set_capacity` raised the capacity moves the kept rows into
buffers of the new size (the decoder reserves the two-branch cache only for the steered steps
and gives the real rows their whole room when the noised ones leave). Anything else that
replaces a layer's tensors from outside (``crop``, ...) is detected at the next update, which
then moves the tensors into a fresh buffer.

The memory arithmetic (bytes per cached position, the CUDA prefill limit) lives here too, so
that the decoder and ``benchmarks/memory_plan.py`` compute it the same way (docs/design.md §3.7).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _layer_class():
    from transformers.cache_utils import DynamicLayer

    class ReservedDynamicLayer(DynamicLayer):
        """A ``DynamicLayer`` with room for ``capacity`` positions, allocated on first use."""

        def __init__(self, capacity: int = 0, window: int | None = None, **kwargs):
            super().__init__(**kwargs)
            self.capacity = capacity
            # Set when this layer stands in for a sliding-window one: it attends like a full
            # layer only while every position fits in the window.
            self.window = window
            self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
            self._views: tuple[torch.Tensor, torch.Tensor] | None = None

        # -- bookkeeping ------------------------------------------------------------------
        def _ours(self) -> bool:
            """Whether ``keys``/``values`` are still the views of our buffers we handed out."""
            views = self._views
            return views is not None and self.keys is views[0] and self.values is views[1]

        def _filled(self) -> int:
            return self.keys.shape[-2] if (self.keys is not None and self.keys.numel()) else 0

        def _show(self, filled: int) -> None:
            keys, values = self._buffers
            self.keys, self.values = keys[..., :filled, :], values[..., :filled, :]
            self._views = (self.keys, self.values)

        def _room(self, needed: int) -> int:
            return self.capacity if needed <= self.capacity else needed + max(16, needed // 4)

        def _adopt(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
            """Move ``keys``/``values`` into fresh buffers with ``room`` positions."""
            filled = keys.shape[-2]
            buffers = []
            for t in (keys, values):
                buffer = t.new_empty((*t.shape[:-2], room, t.shape[-1]))
                buffer[..., :filled, :].copy_(t)
                buffers.append(buffer)
            self._buffers = (buffers[0], buffers[1])
            self._show(filled)

        # -- the DynamicLayer interface ---------------------------------------------------
        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            filled = self._filled()
            total = filled + key_states.shape[-2]
            if self.window is not None and total > self.window:
                raise RuntimeError(
                    f"{total} positions exceed the layer's sliding window of {self.window}, "
                    f"which its reserved cache layer covers in full"
                )
            if not self._ours() or total > self._buffers[0].shape[-2]:
                if filled:
                    old_keys, old_values = self.keys, self.values
                else:
                    old_keys, old_values = key_states[..., :0, :], value_states[..., :0, :]
                self._buffers = self._views = None
                self._adopt(old_keys, old_values, self._room(total))
            keys, values = self._buffers
            keys[..., filled:total, :].copy_(key_states)
            values[..., filled:total, :].copy_(value_states)
            self._show(total)
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            filled = self.get_seq_length()
            if filled == 0:
                return
            room = self._buffers[0].shape[-2] if self._ours() else self._room(filled)
            buffers = []
            for t in (self.keys, self.values):
                rows, heads, _, dim = t.shape
                buffer = t.new_empty((rows * repeats, heads, room, dim))
                buffer.view(rows, repeats, heads, room, dim)[..., :filled, :].copy_(t[:, None])
                buffers.append(buffer)
            self.keys = self.values = self._views = None
            self._buffers = (buffers[0], buffers[1])  # the old buffers are freed here
            self._show(filled)

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            filled = self.get_seq_length()
            if filled == 0:
                return
            if self._ours():
                keys, values = self._buffers
                indices = indices.to(keys.device)
                self.keys = self.values = self._views = None
                if self.capacity <= keys.shape[-2]:
                    self._buffers = (keys[indices], values[indices])  # one copy, room kept; old freed
                else:  # the capacity was raised (set_capacity): the kept rows move into the new room
                    self._buffers = tuple(self._grown(old, indices, filled) for old in (keys, values))
                del keys, values
                self._show(filled)
            else:
                super().batch_select_indices(indices)

        def _grown(self, old: torch.Tensor, indices: torch.Tensor, filled: int) -> torch.Tensor:
            buffer = old.new_empty((len(indices), *old.shape[1:-2], self.capacity, old.shape[-1]))
            buffer[..., :filled, :].copy_(old[indices, ..., :filled, :])
            return buffer

        def reset(self) -> None:
            self._buffers = self._views = None
            super().reset()

        def release(self) -> None:
            """Drop every tensor this layer holds (``reset`` zeroes them in place on some
            transformers versions, 5.17 among them, which keeps the storage alive)."""
            self._buffers = self._views = None
            self.keys = self.values = None
            self.is_initialized = False

    return ReservedDynamicLayer


def reserved_cache(model, capacity: int):
    """An empty ``DynamicCache`` for ``model`` whose full-attention layers allocate room for
    ``capacity`` positions on first use. A sliding-window layer whose window holds all
    ``capacity`` positions attends like a full one (Mistral's 4096 in Idefics2, say) and is
    reserved too; shorter windows stay as they are."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layer = _layer_class()

    def reserve(old):
        if type(old) is DynamicLayer:
            return layer(capacity)
        if type(old) is DynamicSlidingWindowLayer and old.sliding_window >= capacity:
            return layer(capacity, window=old.sliding_window)
        return old

    cache = DynamicCache(config=model.config)
    cache.layers = [reserve(old) for old in cache.layers]
    if cache.layer_class_to_replicate is DynamicLayer:  # layers created on first use
        cache.layer_class_to_replicate = functools.partial(layer, capacity)
    return cache


def is_reserved(cache) -> bool:
    """Whether every layer of ``cache`` is a reserved layer (so :func:`merge_rows` can join it)."""
    layer = _layer_class()
    return bool(cache.layers) and all(type(l) is layer for l in cache.layers)  # noqa: E741


def merge_rows(model, caches, capacity: int):
    """One reserved cache holding the rows of ``caches`` in order (all of the same length,
    every layer reserved), each layer's keys and values copied once into a buffer with room
    for ``capacity`` positions. Each part's layer drops its tensors as soon as it is copied
    (by reference, not by ``reset``), so the peak is the cache plus one merged layer.

    Raises:
        RuntimeError: the caches hold different numbers of positions.
    """
    merged = reserved_cache(model, capacity)
    for index, layer in enumerate(merged.layers):
        parts = [cache.layers[index] for cache in caches]
        filled = parts[0].get_seq_length()
        if filled == 0:
            continue
        if any(part.get_seq_length() != filled for part in parts):
            raise RuntimeError("merge_rows: the caches hold different numbers of positions")
        layer.lazy_initialization(parts[0].keys, parts[0].values)
        layer._buffers = (_stacked(parts, "keys", filled, capacity), _stacked(parts, "values", filled, capacity))
        for part in parts:
            _release(part)
        layer._show(filled)
    return merged


def _stacked(parts, name: str, filled: int, capacity: int) -> torch.Tensor:
    """The ``name`` tensors of ``parts`` stacked over rows in a buffer of ``capacity`` positions."""
    first = getattr(parts[0], name)
    rows = sum(getattr(part, name).shape[0] for part in parts)
    buffer = first.new_empty((rows, *first.shape[1:-2], max(capacity, filled), first.shape[-1]))
    start = 0
    for part in parts:
        tensor = getattr(part, name)
        buffer[start : start + tensor.shape[0], ..., :filled, :].copy_(tensor)
        start += tensor.shape[0]
    return buffer


def _release(layer) -> None:
    """Drop the tensors of a cache layer by reference, whatever ``reset`` does on this
    transformers version."""
    if type(layer) is _layer_class():
        layer.release()
    else:
        layer.keys = layer.values = None
        layer.is_initialized = False


def set_capacity(cache, capacity: int) -> None:
    """Give the reserved layers of ``cache`` room for ``capacity`` positions: layers that have
    less move into buffers of that size at their next row selection (``batch_select_indices``)
    or when they outgrow their room; layers created later get it from the start."""
    layer = _layer_class()
    for old in cache.layers:
        if type(old) is layer:
            old.capacity = capacity
    replicate = getattr(cache, "layer_class_to_replicate", None)
    if isinstance(replicate, functools.partial) and replicate.func is layer:
        cache.layer_class_to_replicate = functools.partial(layer, capacity)


def new_cache(model, capacity: int | None = None):
    """An empty ``DynamicCache`` for ``model`` (transformers is imported only when decoding);
    with ``capacity``, its layers keep room for that many positions (see kv_cache.py)."""
    if capacity is not None:
        return reserved_cache(model, capacity)
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def check_window(cache, positions: int) -> None:
    """Refuse a sliding-window layer whose window is shorter than the padded run: its window
    would count padding columns as positions, and no longer match each request's own."""
    windows = [
        layer.sliding_window
        for layer in cache.layers
        if getattr(layer, "is_sliding", False) and layer.sliding_window < positions
    ]
    if windows:
        raise ValueError(
            f"the model attends over a sliding window of {min(windows)} positions, fewer than this batch "
            f"needs ({positions}: the padded prompts plus max_new_tokens); SafeCoDeDecoder supports sliding "
            f"windows only where they cover the whole run: lower max_new_tokens or batch fewer, shorter prompts"
        )


def cache_nbytes(cache) -> int:
    """Bytes held by the key/value storages of a ``DynamicCache`` (whole storages, so a view
    that keeps a larger buffer alive counts in full)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.untyped_storage().nbytes()
    return total


# ----- memory arithmetic (docs/design.md §3.7, §3.8) -------------------------------------------

#: Share of the free accelerator memory a prefill plans to use (the rest absorbs the allocator's
#: fragmentation and what the estimates below leave out).
MEMORY_FRACTION = 0.9
#: Factor over :func:`prefill_bytes_per_token` for what it leaves out: the vision tower's own
#: activations, the merged input embeddings and the attention mask.
PREFILL_HEADROOM = 2


def _text_shapes(config) -> tuple[int, int, int, int, int, int]:
    """``(layers, heads, kv_heads, head_dim, hidden, intermediate)`` of the language model."""
    text = config.get_text_config()
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    hidden = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    return text.num_hidden_layers, heads, kv_heads, head_dim, hidden, intermediate


def kv_bytes_per_position(config, dtype: torch.dtype) -> int:
    """Bytes one cached position of one row takes in a full-attention KV cache: keys and values
    of every decoder layer, ``2 * layers * kv_heads * head_dim * itemsize`` (LLaVA-1.5-7B in
    bf16: 2 * 32 * 32 * 128 * 2 = 512 KiB; Qwen2-VL-7B, 4 KV heads: 56 KiB).

    ``config``: a model config (the language model's is read through ``get_text_config``);
    ``dtype``: the cache's dtype, the model's."""
    layers, _, kv_heads, head_dim, _, _ = _text_shapes(config)
    return 2 * layers * kv_heads * head_dim * dtype.itemsize


def prefill_bytes_per_token(config, dtype: torch.dtype, columns: int) -> int:
    """An upper estimate of the temporaries one prompt token (a row x column) holds during a
    prefill forward, inside one decoder layer at a time (the previous layer's are freed): the
    hidden state, its normed copy, the attention output and its projection, the MLP's output
    (5 hidden widths), queries, keys and values, the MLP's gate, up and product
    (3 intermediate widths), in ``dtype``, plus one row of fp32 attention scores per head
    (``heads * columns * 4`` bytes) in case the attention materializes them (eager, or SDPA's
    math path). Bytes; our estimate, not a measured figure."""
    _, heads, kv_heads, head_dim, hidden, intermediate = _text_shapes(config)
    width = 5 * hidden + (heads + 2 * kv_heads) * head_dim + 3 * intermediate
    return width * dtype.itemsize + heads * columns * 4


def prefill_tokens_from_free_memory(
    config, dtype: torch.dtype, free_bytes: int, cache_positions: int, columns: int
) -> int:
    """The most prompt tokens one prefill forward should take with ``free_bytes`` of device
    memory free: ``MEMORY_FRACTION`` of it, less the run's two-branch KV cache
    (``cache_positions`` row-positions of :func:`kv_bytes_per_position`, all allocated by the
    last chunk), over ``PREFILL_HEADROOM * prefill_bytes_per_token``. At least 1: one request
    per chunk is the least a prefill can take (if even that does not fit, the forward itself
    raises the device's out-of-memory error)."""
    budget = int(free_bytes * MEMORY_FRACTION) - cache_positions * kv_bytes_per_position(config, dtype)
    per_token = PREFILL_HEADROOM * prefill_bytes_per_token(config, dtype, columns)
    return max(1, budget // per_token)


def free_device_bytes(device: torch.device) -> int:
    """Bytes a CUDA ``device`` can still hand out: the driver's free memory
    (``torch.cuda.mem_get_info``) plus what PyTorch's caching allocator holds unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
