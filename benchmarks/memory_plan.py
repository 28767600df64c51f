"""The largest batch of requests that fits on one card, per model, computed from the models'
shapes (docs/design.md §3.7): SafeCoDe as the decoder runs it, as it ran before the noised rows
reserved only the steered steps, and plain generation for comparison.

Nothing is downloaded and nothing runs on a GPU: each model's config is built in code with
transformers' config classes (the published shapes), its parameters are counted on the meta
device, and the KV bytes per position come from ``kv_cache.kv_bytes_per_position``, the
function the decoder itself uses (tests/benchmarks/test_memory_plan.py checks this arithmetic against the
bytes a tiny model's cache holds).

    python benchmarks/memory_plan.py [--new-tokens 256] [--steer-steps 5] [--text-tokens 64]

Per request of ``c`` prompt positions (image tokens + text), ``s`` steered steps, ``r`` new
tokens, ``P`` KV bytes per position and ``L`` layers:

- plain generation holds ``(c + r) P``;
- SafeCoDe holds ``2 (c + s) P`` while both branches run and ``(c + r) P`` after the noised rows
  leave; while the rows move, one layer holds both, so its peak is the larger of
  ``2 (c + s) P + (c + r) P / L`` and ``(c + r) P + 2 (c + s) P / L``;
- SafeCoDe before reserved ``2 (c + r) P`` from the first prefill (its column counts the cache
  alone: with no prefill limit on CUDA it prefilled the whole batch in one forward, whose
  temporaries came on top, so fewer requests fit in practice).

A card's budget is ``MEMORY_FRACTION`` of its memory less the bf16 weights and 1 GiB for the
CUDA context; the chunked prefill takes what is left after the cache, so one request's prefill
temporaries (``PREFILL_HEADROOM * prefill_bytes_per_token`` per token) must fit besides.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from safecode_kernels.decoding.kv_cache import (  # noqa: E402
    MEMORY_FRACTION,
    PREFILL_HEADROOM,
    kv_bytes_per_position,
    prefill_bytes_per_token,
)

GIB = 2**30
#: Memory as ``nvidia-smi`` reports it: H100 SXM 80 GB and H200 141 GB.
CARDS = {"80 GB (H100)": 81559 * 2**20, "141 GB (H200)": 143771 * 2**20}
CUDA_CONTEXT = GIB
DTYPE = torch.bfloat16


def _clip_336() -> dict:
    """CLIP ViT-L/14 at 336 pixels, LLaVA's vision tower."""
    return dict(
        model_type="clip_vision_model",
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
    )


def _llama(hidden: int, intermediate: int, layers: int, heads: int) -> dict:
    return dict(
        model_type="llama",
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=32064,
        max_position_embeddings=4096,
    )


def _qwen2_vl(hidden: int, intermediate: int, heads: int, kv_heads: int, vocab: int, tied: bool) -> dict:
    text = dict(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=28,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=32768,
    )
    vision = dict(depth=32, embed_dim=1280, hidden_size=hidden, num_heads=16, mlp_ratio=4, patch_size=14)
    return dict(text_config=text, vision_config=vision, tie_word_embeddings=tied)


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    family: str  # "llava", "llava_next" or "qwen2_vl"
    settings: dict
    image_tokens: int
    image_note: str

    def config(self):
        import transformers

        config_class = {
            "llava": transformers.LlavaConfig,
            "llava_next": transformers.LlavaNextConfig,
            "qwen2_vl": transformers.Qwen2VLConfig,
        }[self.family]
        if self.family == "qwen2_vl":
            return config_class(**self.settings)
        return config_class(text_config=self.settings, vision_config=_clip_336())

    def parameters(self) -> int:
        """Parameters of the whole model (vision tower included), counted on the meta device."""
        if self.name not in _PARAMETERS:
            _PARAMETERS[self.name] = self._count()
        return _PARAMETERS[self.name]

    def _count(self) -> int:
        import transformers

        model_class = {
            "llava": transformers.LlavaForConditionalGeneration,
            "llava_next": transformers.LlavaNextForConditionalGeneration,
            "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
        }[self.family]
        with torch.device("meta"):
            model = model_class(self.config())
        return sum(p.numel() for p in model.parameters())


_PARAMETERS: dict[str, int] = {}

MODELS = [
    Model("LLaVA-1.5-7B", "llava", _llama(4096, 11008, 32, 32), 576, "336 px: 24 x 24 patches"),
    Model("LLaVA-1.5-13B", "llava", _llama(5120, 13824, 40, 40), 576, "336 px: 24 x 24 patches"),
    Model(
        "LLaVA-NeXT-7B (Vicuna)",
        "llava_next",
        _llama(4096, 11008, 32, 32),
        2928,
        "672 x 672 px: 576 + 48 x (48 + 1 newline)",
    ),
    Model("Qwen2-VL-2B", "qwen2_vl", _qwen2_vl(1536, 8960, 12, 2, 151936, True), 1024, "896 x 896 px: 32 x 32 merged"),
    Model(
        "Qwen2-VL-7B", "qwen2_vl", _qwen2_vl(3584, 18944, 28, 4, 152064, False), 1024, "896 x 896 px: 32 x 32 merged"
    ),
]


def cache_bytes(position: int, layers: int, requests: int, columns: int, steer_steps: int, new_tokens: int) -> dict:
    """KV-cache bytes of ``requests`` requests of ``columns`` prompt positions (``position``:
    bytes per position, ``layers``: decoder layers): ``two_branch`` (both branches, the steered
    steps reserved), ``after_drop`` (the real rows with room for every new token), ``peak``
    (the larger, with one layer holding both while the rows move), ``before`` (both branches
    reserving every new token, as before) and ``plain`` (plain generation)."""
    two_branch = 2 * requests * (columns + min(steer_steps, new_tokens)) * position
    after_drop = requests * (columns + new_tokens) * position
    peak = max(two_branch + after_drop // layers, after_drop + two_branch // layers, two_branch + two_branch // layers)
    before = 2 * requests * (columns + new_tokens) * position
    return dict(two_branch=two_branch, after_drop=after_drop, peak=peak, before=before, plain=after_drop)


def largest_batches(model: Model, card: int, text_tokens: int, steer_steps: int, new_tokens: int) -> dict:
    """The largest number of requests per mode (``safecode``, ``before``, ``plain``) on ``card`` bytes."""
    config = model.config()
    layers = config.get_text_config().num_hidden_layers
    position = kv_bytes_per_position(config, DTYPE)
    columns = model.image_tokens + text_tokens
    token = PREFILL_HEADROOM * prefill_bytes_per_token(config, DTYPE, columns)
    budget = int((card - CUDA_CONTEXT - model.parameters() * DTYPE.itemsize) * MEMORY_FRACTION)

    def fits(mode: str, requests: int) -> bool:
        sizes = cache_bytes(position, layers, requests, columns, steer_steps, new_tokens)
        if mode == "safecode":
            return sizes["peak"] + 2 * columns * token <= budget  # one request per prefill chunk
        if mode == "plain":
            return sizes["plain"] + columns * token <= budget
        return sizes["before"] <= budget  # the cache alone: an upper bound

    out = {}
    for mode in ("safecode", "before", "plain"):
        requests = 0
        step = 1 << 16
        while step:  # the largest count that fits, by halving steps (every size is monotone)
            if fits(mode, requests + step):
                requests += step
            step //= 2
        out[mode] = requests
    return out


def table(text_tokens: int, steer_steps: int, new_tokens: int) -> str:
    cards = list(CARDS)
    lines = [
        f"Prompt: image tokens + {text_tokens} text tokens; {steer_steps} steered steps, {new_tokens} new tokens; "
        f"bf16 weights and KV cache; budget {MEMORY_FRACTION:.0%} of (card - weights - 1 GiB). "
        "Before: the cache alone (its whole-batch prefill came on top); plain: one request per prefill forward.",
        "",
        "| model | image tokens | KV / position | weights | KV / request: SafeCoDe peak, before, plain "
        + "".join(f"| {card}: SafeCoDe, before, plain " for card in cards)
        + "|",
        "|---|---:|---:|---:|---:" + "|---:" * len(cards) + "|",
    ]
    for model in MODELS:
        config = model.config()
        position = kv_bytes_per_position(config, DTYPE)
        layers = config.get_text_config().num_hidden_layers
        one = cache_bytes(position, layers, 1, model.image_tokens + text_tokens, steer_steps, new_tokens)
        weights = model.parameters() * DTYPE.itemsize
        mib = lambda n: f"{n / 2**20:,.0f}"  # noqa: E731
        row = (
            f"| {model.name} | {model.image_tokens} ({model.image_note}) | {position // 1024} KiB "
            f"| {weights / GIB:.1f} GiB | {mib(one['peak'])}, {mib(one['before'])}, {mib(one['plain'])} MiB "
        )
        for card in cards:
            b = largest_batches(model, CARDS[card], text_tokens, steer_steps, new_tokens)
            row += f"| **{b['safecode']}**, {b['before']}, {b['plain']} "
        lines.append(row + "|")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--steer-steps", type=int, default=5)
    parser.add_argument("--text-tokens", type=int, default=64, help="prompt tokens besides the image's")
    args = parser.parse_args(argv)
    print(table(args.text_tokens, args.steer_steps, args.new_tokens))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
