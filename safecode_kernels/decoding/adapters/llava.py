"""LLaVA-1.5 (``LlavaForConditionalGeneration``).

The processor expands the ``<image>`` placeholder into one token per visual feature, and
the model scatters the projected CLIP features into those positions; positions are plain
1-D, so the base adapter covers everything.
"""

from __future__ import annotations

from .base import ModelAdapter


class LlavaAdapter(ModelAdapter):
    model_types = ("llava",)
    family = "llava"
    model_class_names = ("LlavaForConditionalGeneration",)
    # Vicuna ends a turn with its EOS </s>; checkpoints on ChatML (Qwen, Yi) or Llama-3 language
    # models end it with these.
    end_of_turn_tokens = ("<|im_end|>", "<|eot_id|>")
