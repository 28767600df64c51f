"""Padding never leaves a query row without a key (docs/design.md §3.2).

Some CUDA SDPA paths return NaN for a query row whose every key is masked out (a left-padding
column of a batched prefill is such a row); the NaN enters the KV cache, and a masked-out key
with a NaN value still poisons the real rows of the later layers (0 * NaN). These tests run the
decoder on every family with an attention kernel, registered through transformers'
``AttentionInterface``, that wraps SDPA and returns NaN for such rows and counts them: no
forward may contain one, and the batched tokens equal each request's tokens alone.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from safecode_kernels.decoding import SafeCoDeDecoder
from safecode_kernels.decoding.noise import noised_views
from safecode_kernels.testing.tiny_models import BACKEND, PARAMS, batch

NAN_SDPA = "nan_sdpa"
MAX_NEW = 6


class _NanSdpa:
    """SDPA, then NaN in every query row whose boolean mask shows no key; counts the calls
    that had a mask and the rows it poisoned."""

    def __init__(self):
        self.masked_calls = 0
        self.empty_rows = 0

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        if attention_mask is None:  # causal without padding: every row sees itself
            return out, weights
        assert attention_mask.dtype == torch.bool, "the sdpa mask function makes boolean masks"
        self.masked_calls += 1
        empty = ~attention_mask.any(-1)  # [batch, 1 or heads, queries]
        self.empty_rows += int(empty.sum())
        # The output is [batch, queries, heads, head_dim].
        return out.masked_fill(empty.transpose(1, 2)[..., None], float("nan")), weights


KERNEL = _NanSdpa()
AttentionInterface.register(NAN_SDPA, KERNEL)
# Without a mask function of its own, transformers would hand a custom kernel no mask at all.
AttentionMaskInterface.register(NAN_SDPA, sdpa_mask)


@contextlib.contextmanager
def nan_attention(model):
    """``model`` (a cached tiny model) on the NaN kernel, its own kernels restored afterwards."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
    before = {key: config._attn_implementation_internal for key, config in configs.items()}
    try:
        model.set_attn_implementation(NAN_SDPA)
    except ValueError:
        # A vision part that takes no custom kernel (InstructBLIP's Q-Former in transformers
        # 5.5): the language model, whose padded prefill is under test, takes it alone.
        model.get_decoder().set_attn_implementation(NAN_SDPA)
    try:
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation_internal = before[key]


def test_the_kernel_poisons_rows_without_a_key():
    """The kernel under test does what the CUDA paths do, so the tests below can fail."""
    torch.manual_seed(0)
    query, key, value = (torch.randn(1, 2, 3, 4) for _ in range(3))
    mask = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])[None, None]
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = False, 1
    kernel = _NanSdpa()
    out, _ = kernel(module, query, key, value, mask)
    assert kernel.empty_rows == 1 and out[:, 1].isnan().all()
    assert not out[:, 0].isnan().any() and not out[:, 2].isnan().any()


# "chunked": one request per prefill forward, each chunk deciding alone whether to share its
# prefix, so that with "mixed" prompts some rows share the prefix columns and some do not.
MODES = {
    "shared": dict(share_prefix=True, min_shared_prefix=1),
    "unshared": dict(share_prefix=False),
    "chunked": dict(share_prefix=True, min_shared_prefix=1, prefill_chunk_tokens=1),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("prefix", ["shared", "none", "mixed"])
def test_batched_equals_alone_on_a_nan_kernel(tiny, prefix, mode):
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor, prefix)
    # The noised view of a request depends on its place in the batch: fix them.
    kwargs = dict(kwargs, noised_images=noised_views(images, 0.1, seed=0), max_new_tokens=MAX_NEW)
    decoder = SafeCoDeDecoder(model, processor, PARAMS, steer_steps=3, refusal=refusal, backend=BACKEND, **MODES[mode])
    KERNEL.masked_calls = KERNEL.empty_rows = 0
    with nan_attention(model):
        batched = decoder.generate(images, prompts, verdicts, **kwargs)
        assert KERNEL.masked_calls > 0  # the padded prefill went through the kernel
        assert KERNEL.empty_rows == 0
        alone = []
        for i in range(len(images)):
            one = {k: [v[i]] if isinstance(v, list) else v for k, v in kwargs.items()}
            alone.append(decoder.generate([images[i]], [prompts[i]], [verdicts[i]], **one).sequences[0])
    assert batched.sequences == alone
    assert all(len(s) == MAX_NEW for s in alone)
