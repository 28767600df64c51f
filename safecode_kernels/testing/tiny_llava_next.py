"""A tiny LLaVA-NeXT (any-resolution tiling) built offline; see tiny_models.py."""

from __future__ import annotations

import functools

import torch

from .tiny import LLAVA_TEMPLATE
from .tiny_models import finish, text_config, tiny_tokenizer

#: Tiles of 28x28 pixels (2x2 image tokens each); a square image takes the 2x2-tile grid, a
#: 2:1 image the 1x2 or 2x1 grid, so the image-token count follows the aspect ratio.
PINPOINTS = [[28, 56], [56, 28], [56, 56]]


@functools.cache
def tiny_llava_next():
    """LLaVA-NeXT: CLIP tiles of 28x28 + Llama; the number of image tokens depends on the image's shape."""
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tokenizer = tiny_tokenizer()
    config = LlavaNextConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            projection_dim=32,
        ),
        text_config=dict(model_type="llama", **text_config()),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = finish(LlavaNextForConditionalGeneration(config))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_grid_pinpoints=PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    return model, processor
