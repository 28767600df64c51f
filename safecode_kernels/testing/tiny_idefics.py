"""Tiny Idefics2 and Idefics3 models built offline, with image splitting on; see tiny_models.py.

Each family gets its own tokenizer: the processors need tokens the shared one lacks
(``<fake_token_around_image>``, ``<end_of_utterance>``, Idefics3's ``<global-img>`` and
``<row_i_col_j>``), and adding them to the cached shared tokenizer would change it for the
other families.
"""

from __future__ import annotations

import functools

import torch

from .tiny import CORPUS
from .tiny import tiny_tokenizer as train_tokenizer
from .tiny_models import finish, text_config

IDEFICS_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<fake_token_around_image>", "<image>", "<end_of_utterance>"]
# Idefics3 marks each tile with its place in the grid (up to 6x6) and the overview with <global-img>.
IDEFICS3_TOKENS = IDEFICS_TOKENS + ["<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]

# The conversation format of the released checkpoints ("User:<image>...<end_of_utterance>\nAssistant:";
# a turn that starts with text gets "Role: "), with the tokenizer's BOS in front as they have it.
IDEFICS_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}<image>{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

_CORPUS = list(CORPUS) + ["System: Be brief. User: What is this? Assistant: It is a picture of a cat."]

# Tokens per (sub-)image: Idefics2's perceiver latents, Idefics3's pixel-shuffled patches.
IMAGE_SEQ_LEN = 4

# The PIL image processors are imported from their modules: transformers 5.17's top-level names
# for them are placeholders that ask for torchvision.


def _tokenizer(special_tokens):
    return train_tokenizer(400, special_tokens, _CORPUS)


def _text_config(tokenizer, model_type: str, **extra) -> dict:
    """tiny_models.text_config with this tokenizer's vocabulary and ids."""
    return {
        **text_config(),
        "model_type": model_type,
        "vocab_size": len(tokenizer) + 8,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **extra,
    }


def _finish(model, tokenizer):
    model = finish(model)
    # Chat answers end with <end_of_utterance>, as with the released checkpoints.
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    return model


@functools.cache
def tiny_idefics2():
    """Idefics2: NaViT-style SigLIP (patches of 8 at any resolution, ``pixel_attention_mask``) +
    perceiver resampler (4 latents per sub-image) + Mistral. Splitting always gives 4 quarters
    + the whole image, so the token count is fixed (5 x 4 image tokens), but the sub-images keep
    their size (28 or 32 pixels, and 56 or 64 for the whole) and are padded to the largest."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    tokenizer = _tokenizer(IDEFICS_TOKENS)
    image_processor = Idefics2ImageProcessorPil(
        do_image_splitting=True,
        size={"shortest_edge": 28, "longest_edge": 64},
    )
    processor = Idefics2Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=IDEFICS_TEMPLATE,
    )
    config = Idefics2Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        # The latents start at ones; with the default 0.02 init the attention over the image
        # barely moves them, and the image (or its noise) would hardly change the logits.
        perceiver_config=dict(
            hidden_size=32,
            resampler_n_latents=IMAGE_SEQ_LEN,
            resampler_depth=1,
            resampler_n_heads=2,
            resampler_head_dim=16,
            num_key_value_heads=1,
            initializer_range=0.3,
        ),
        # Mistral's 4096-token sliding window, as released: longer than any run here, so the
        # decoder's reserved cache covers it with full layers (test_idefics.py checks it).
        text_config=_text_config(tokenizer, "mistral", rms_norm_eps=1e-5, sliding_window=4096),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(0)
    return _finish(Idefics2ForConditionalGeneration(config), tokenizer), processor


@functools.cache
def tiny_idefics3():
    """Idefics3: SigLIP on 28x28 tiles (patches of 7, pixel shuffle by 2: 4 image tokens per tile)
    + Llama. Images keep their size (no resize) and are cut into a grid of tiles plus an
    overview: a 56x56 image gives 2x2 tiles + 1, a 64x64 one (scaled up to 84) 3x3 tiles + 1."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = _tokenizer(IDEFICS3_TOKENS)
    image_processor = Idefics3ImageProcessorPil(
        do_resize=False,
        do_image_splitting=True,
        max_image_size={"longest_edge": 28},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=IDEFICS_TEMPLATE,
    )
    config = Idefics3Config(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=7,
        ),
        text_config=_text_config(tokenizer, "llama"),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
    )
    torch.manual_seed(0)
    return _finish(Idefics3ForConditionalGeneration(config), tokenizer), processor
