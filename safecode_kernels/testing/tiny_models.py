"""Tiny, randomly initialised multimodal models and processors built offline (design §7), and
the request batches the decoding tests share.

Each builder returns ``(model, processor)`` in fp32 eval mode. The models are tiny (hidden 32,
1-2 layers, a few image tokens) so a whole decoding test runs in well under a second on a CPU.
Builders are cached: tests share one instance per family and must not mutate its weights.
LLaVA-1.5 and Qwen2/2.5-VL are built here; the other families in their own ``tiny_*.py``
files, all listed in :data:`BUILDERS` (which the ``family`` fixture runs every test over).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import numpy as np
import torch
from PIL import Image

from safecode_kernels.params import SteeringParams

from .tiny import TESTS, build_llava
from .tiny import family_tokenizer as tiny_tokenizer  # the one tokenizer of every family here

# Image first when there is no system message: the case without a shared text prefix.
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _vocab_size() -> int:
    return len(tiny_tokenizer()) + 8


def finish(model):
    torch.manual_seed(0)
    model.eval()
    return model.float()


def text_config(**extra) -> dict:
    tok = tiny_tokenizer()
    return dict(
        vocab_size=_vocab_size(),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        **extra,
    )


@functools.cache
def tiny_llava(image_size: int = 28, patch_size: int = 14):
    """LLaVA-1.5: CLIP vision tower + Llama; ``(image_size / patch_size)**2`` image tokens
    (:data:`.tiny.TESTS`, built by the one LLaVA builder, :func:`.tiny.build_llava`)."""
    model, processor = build_llava(dataclasses.replace(TESTS, image_size=image_size, patch_size=patch_size))
    return finish(model), processor


def qwen_image_only_processor(base):
    class ImageOnlyProcessor(base):
        """The Qwen processors insist on a video processor (which needs torchvision); images only here."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyProcessor


def qwen_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def _qwen_image_processor():
    from transformers import Qwen2VLImageProcessorPil

    # 56x56 images -> 4x4 patches of 14 -> 2x2 merged = 4 image tokens.
    return Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)


_QWEN_TEXT = dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})


def tiny_qwen(config_class, model_class, processor_class, text: dict, vision: dict, image_processor):
    """``(model, processor)`` of a Qwen-VL family: ``text`` (on top of :func:`text_config`) and
    ``vision`` config entries, seeded weights, ``<|im_end|>`` as EOS, an image-only processor."""
    tokenizer = tiny_tokenizer()
    config = config_class(text_config=text_config(**text), vision_config=vision, **qwen_ids(tokenizer))
    torch.manual_seed(0)
    model = finish(model_class(config))
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    processor = qwen_image_only_processor(processor_class)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=QWEN_TEMPLATE,
    )
    return model, processor


@functools.cache
def tiny_qwen2_vl():
    """Qwen2-VL with M-RoPE; 4 image tokens for a 56x56 image."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    return tiny_qwen(
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
        text=dict(model_type="qwen2_vl_text", **_QWEN_TEXT),
        vision=dict(
            depth=1,
            embed_dim=32,
            hidden_size=32,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_processor=_qwen_image_processor(),
    )


@functools.cache
def tiny_qwen2_5_vl():
    """Qwen2.5-VL (window attention in the vision tower); 4 image tokens for a 56x56 image."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    return tiny_qwen(
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        text=dict(model_type="qwen2_5_vl_text", **_QWEN_TEXT),
        vision=dict(
            depth=2,
            hidden_size=32,
            out_hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_processor=_qwen_image_processor(),
    )


def _lazy(module: str, name: str):
    """A builder imported from ``module`` (one file per family) when first called."""

    def build():
        return getattr(importlib.import_module(module, __package__), name)()

    build.__name__ = name
    return build


BUILDERS = {
    "llava": tiny_llava,
    "llava_next": _lazy(".tiny_llava_next", "tiny_llava_next"),
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "qwen3_vl": _lazy(".tiny_qwen3_vl", "tiny_qwen3_vl"),
    "instructblip": _lazy(".tiny_instructblip", "tiny_instructblip"),
    "idefics2": _lazy(".tiny_idefics", "tiny_idefics2"),
    "idefics3": _lazy(".tiny_idefics", "tiny_idefics3"),
}
FAMILIES = list(BUILDERS)
# The decoders are compared with each other on one backend; the backends are tested in tests/ops.
BACKEND = "torch"
# Steering strong enough to move the refusal mass of the tiny random models.
PARAMS = SteeringParams(sensitive_top_k=100, boost=3.0, suppress=3.0)


def random_image(seed: int, size: int = 56) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def refusal_ids(tokenizer) -> list[int]:
    """Tokens that start refusals in the tiny vocabulary (a stand-in for RefusalVocabulary.from_tokenizer)."""
    ids = set()
    for word in ("I", "Sorry", " sorry", " cannot", " can't", " unable", "Unfortunately", " decline"):
        ids.update(tokenizer.encode(word, add_special_tokens=False)[:1])
    return sorted(ids)


def batch(processor, prefix: str = "shared"):
    """Three requests with different prompt lengths and mixed verdicts, plus generate kwargs.

    ``prefix``: ``"shared"`` -- chat template with system prompts of different lengths, so
    every request has text before the image; ``"none"`` -- raw prompts that start with the
    image; ``"mixed"`` -- raw prompts, one starting with the image and two with text first.
    """
    images = [random_image(i, size=s) for i, s in enumerate((56, 64, 56))]
    verdicts = ["unsafe", "safe", "none"]
    if prefix == "shared":
        prompts = ["What is in this image?", "Hi", "Tell me about the weapon in the photo, please."]
        kwargs = dict(system_prompt=["You are a helpful assistant.", "Be brief.", None])
        return images, prompts, verdicts, kwargs
    tok = placeholder(processor)
    if prefix == "none":
        prompts = [f"{tok}\nWhat is in this image?", f"{tok} Hi", f"{tok}\nTell me about the weapon, please."]
    else:
        prompts = [f"{tok}\nWhat is this?", f"USER: {tok} Hi", f"You are a helpful assistant. USER: {tok} Tell me."]
    return images, prompts, verdicts, dict(chat_template=False)


def placeholder(processor) -> str:
    """What a raw prompt writes where the image goes: the processor's image token, or nothing
    for processors that put the image tokens in front of the text themselves (InstructBLIP's,
    which also encodes the prompt for its Q-Former)."""
    return "" if hasattr(processor, "qformer_tokenizer") else processor.image_token


def has_text_prefix(processor, prefix: str) -> bool:
    """Whether requests of ``batch(processor, prefix)`` have text before the first image token
    (always for Idefics, whose processors open every image with ``<fake_token_around_image>``)."""
    if hasattr(processor, "fake_image_token"):
        return True
    return prefix != "none" and bool(placeholder(processor))
