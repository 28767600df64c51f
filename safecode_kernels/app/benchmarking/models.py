"""Randomly initialised benchmark models, built offline from a config (no download), and the
benchmark's requests.

The models come from the project's one LLaVA builder, :func:`safecode_kernels.testing.tiny.build_llava`
(the LLaVA-1.5 architecture: CLIP vision tower, two-layer MLP projector, Llama language model,
at any :class:`LlavaSpec`); :func:`build_llava` here caches it per ``(spec, seed)``.
:data:`BENCH` is the size the end-to-end benchmarks use on a CPU (hidden 512, 4 layers,
vocabulary 32000, 576 image tokens from a 336-pixel image in 14-pixel patches), :data:`TINY`
the size of the smoke tests.

The tokenizer (:func:`build_tokenizer`) is a byte-level BPE trained in code over a small
English corpus and padded with unused entries up to the model's vocabulary, so the LM head
has the real size (the unused entries are never produced by encoding, and decode to their
literal names). The processor is the real ``LlavaProcessor`` with ``CLIPImageProcessorPil``
and a LLaVA-1.5 style chat template (``<s>{system}\\nUSER: <image>\\n{prompt} ASSISTANT:``).

Example::

    >>> from safecode_kernels.app.benchmarking.models import TINY, build_llava
    >>> model, processor = build_llava(TINY)
    >>> model.config.text_config.vocab_size, processor.tokenizer.vocab_size
    (512, 512)
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

from ...testing import tiny
from ...testing.tiny import BENCH, SYSTEM_SENTENCES, USER_PROMPTS, LlavaSpec
from ...testing.tiny import BENCH_SMOKE as TINY
from ...testing.tiny import padded_tokenizer as build_tokenizer

__all__ = [
    "BENCH",
    "TINY",
    "LlavaSpec",
    "bench_image",
    "bench_requests",
    "build_llava",
    "build_tokenizer",
    "system_prompt",
]


@functools.lru_cache(maxsize=4)
def build_llava(spec: LlavaSpec = BENCH, seed: int = 0):
    """``(model, processor)``: LLaVA-1.5 of size ``spec`` with random fp32 weights, eval mode
    (:func:`safecode_kernels.testing.tiny.build_llava`).

    Cached per ``(spec, seed)``: callers share one instance and must not change its weights.
    The generation config of the benchmark specs has no EOS token, so every decoder generates
    exactly ``max_new_tokens`` tokens (what a benchmark wants); pass ``eos_token_id`` to change that.
    """
    return tiny.build_llava(spec, seed)


def system_prompt(tokenizer, tokens: int = 300) -> str:
    """A system prompt of about ``tokens`` tokens (whole sentences, at least ``tokens``)."""
    parts: list[str] = []
    for sentence in itertools.cycle(SYSTEM_SENTENCES):
        parts.append(sentence)
        text = " ".join(parts)
        if len(tokenizer.encode(text, add_special_tokens=False)) >= tokens:
            return text
    raise AssertionError("unreachable")


def bench_image(seed: int, size: tuple[int, int] = (480, 360)):
    """A deterministic RGB photo stand-in: smooth colour gradients plus pixel noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.002, 0.03, 2).tolist() + [rng.uniform(0, 6.3)]
        channels.append(127 + 90 * np.sin(fx * x + fy * y + phase))
    pixels = np.stack(channels, -1) + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def bench_requests(batch: int, seed: int = 0):
    """``batch`` requests ``(images, prompts, verdicts)``: different prompts and image sizes
    (so prompt lengths differ), verdicts cycling unsafe / safe / none."""
    sizes = ((480, 360), (640, 480), (360, 360), (500, 375))
    images = [bench_image(seed * 1000 + i, sizes[i % len(sizes)]) for i in range(batch)]
    prompts = [USER_PROMPTS[i % len(USER_PROMPTS)] for i in range(batch)]
    verdicts = [("unsafe", "safe", "none")[i % 3] for i in range(batch)]
    return images, prompts, verdicts
