"""Running the three decoders on the same requests and comparing them (docs/design.md §3.10's bar)."""

from __future__ import annotations

import pytest
import torch

from safecode_kernels.decoding import SafeCoDeDecoder, naive_safecode_generate, two_cache_safecode_generate
from safecode_kernels.testing.tiny_models import BACKEND, PARAMS

STEER = 3
MAX_NEW = 6


def run_all(model, processor, refusal, images, prompts, verdicts, **kwargs):
    """(decoder, naive, two-cache) results on the same requests, greedy, with logits."""
    settings = dict(params=PARAMS, steer_steps=STEER, refusal=refusal, backend=BACKEND)
    kwargs = dict(max_new_tokens=MAX_NEW, return_logits=True, **kwargs)
    # min_shared_prefix=1: share even the tiny prompts' few prefix tokens (the path under test).
    fused = SafeCoDeDecoder(model, processor, **settings, min_shared_prefix=1).generate(
        images, prompts, verdicts, **kwargs
    )
    naive = naive_safecode_generate(model, processor, images, prompts, verdicts, **settings, **kwargs)
    two = two_cache_safecode_generate(model, processor, images, prompts, verdicts, **settings, **kwargs)
    return fused, naive, two


def assert_same(result, oracle, atol=1e-4):
    assert result.sequences == oracle.sequences
    assert result.texts == oracle.texts
    for name in ("logits", "noised_logits", "steered_logits"):
        for got, want in zip(getattr(result, name), getattr(oracle, name)):
            assert got.shape == want.shape, name
            torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=name)  # -inf must match -inf
    for got, want in zip(result.steering, oracle.steering):
        assert [r.token for r in got] == [r.token for r in want]
        for a, b in zip(got, want):
            assert a.refusal_mass_before == pytest.approx(b.refusal_mass_before, abs=1e-5)
            assert a.refusal_mass_after == pytest.approx(b.refusal_mass_after, abs=1e-5)
