"""benchmarks/memory_plan.py's arithmetic: the cache sizes it plans equal the bytes the
decoder's cache holds on a tiny model, and its largest batches are the largest that fit."""

from __future__ import annotations

import pytest
import torch

from safecode_kernels.decoding import SafeCoDeDecoder
from safecode_kernels.decoding.kv_cache import kv_bytes_per_position
from safecode_kernels.testing.tiny_models import BACKEND, BUILDERS, PARAMS, batch, refusal_ids
from tests.benchmarks import load_script


@pytest.fixture(scope="module")
def plan():
    return load_script("memory_plan")


@pytest.mark.parametrize("new_tokens", [2, 6])
def test_planned_cache_is_what_the_decoder_holds(plan, single_torch_thread, new_tokens):
    model, processor = BUILDERS["llava"]()
    images, prompts, verdicts, kwargs = batch(processor)
    decoder = SafeCoDeDecoder(
        model, processor, PARAMS, steer_steps=3, refusal=refusal_ids(processor.tokenizer), backend=BACKEND
    )
    result = decoder.generate(images, prompts, verdicts, max_new_tokens=new_tokens, eos_token_id=[], **kwargs)
    position = kv_bytes_per_position(model.config, torch.float32)
    layers = model.config.get_text_config().num_hidden_layers
    sizes = plan.cache_bytes(position, layers, len(prompts), result.stats["prompt_columns"], 3, new_tokens)
    if new_tokens > 3:  # the noised rows leave after 3 steered steps
        assert result.stats["cache_bytes_two_branch"] == sizes["two_branch"]
        assert result.stats["cache_bytes_after_drop"] == sizes["after_drop"]
    else:  # every answer ends while steered: the two-branch cache is never re-sized
        assert "cache_bytes_two_branch" not in result.stats
        assert sizes["two_branch"] == 2 * sizes["after_drop"]
    assert sizes["before"] == 2 * sizes["plain"] and sizes["peak"] >= max(sizes["two_branch"], sizes["after_drop"])


def test_largest_batches_are_the_largest_that_fit(plan):
    llava = plan.MODELS[0]
    assert llava.name == "LLaVA-1.5-7B"
    config = llava.config()
    assert kv_bytes_per_position(config, torch.bfloat16) == 2 * 32 * 32 * 128 * 2  # 512 KiB
    assert 7.0e9 < llava.parameters() < 7.1e9
    small, large = (plan.largest_batches(llava, plan.CARDS[card], 64, 5, 256) for card in plan.CARDS)
    for mode in ("safecode", "before", "plain"):
        assert 0 < small[mode] < large[mode]
    assert small["before"] < small["safecode"] < small["plain"]
    # The SafeCoDe batch fits and one more request does not.
    columns, position = 576 + 64, kv_bytes_per_position(config, torch.bfloat16)
    token = plan.PREFILL_HEADROOM * plan.prefill_bytes_per_token(config, torch.bfloat16, columns)
    budget = int((plan.CARDS["80 GB (H100)"] - plan.CUDA_CONTEXT - 2 * llava.parameters()) * plan.MEMORY_FRACTION)

    def needs(requests):
        return plan.cache_bytes(position, 32, requests, columns, 5, 256)["peak"] + 2 * columns * token

    assert needs(small["safecode"]) <= budget < needs(small["safecode"] + 1)
