"""A tiny InstructBLIP (vision tower + Q-Former + Llama) built offline; see tiny_models.py."""

from __future__ import annotations

import functools

import torch

from .tiny import CORPUS
from .tiny import tiny_tokenizer as train_tokenizer
from .tiny_models import finish, text_config

#: Query tokens of the Q-Former = image tokens the processor puts in front of the text.
NUM_QUERY_TOKENS = 4
IMAGE_SIZE = 28


def tokenizers():
    """Fresh ``(tokenizer, qformer_tokenizer)``: the processor adds ``<image>`` to the first, so
    it must not be the tokenizer other families share. Neither defines ``image_token``."""
    special = ["<unk>", "<s>", "</s>", "<pad>"]
    return train_tokenizer(320, special, CORPUS), train_tokenizer(300, special, CORPUS)


@functools.cache
def tiny_instructblip(decoder_only: bool = True):
    """InstructBLIP: ViT (28x28, patch 14) + a 1-layer Q-Former with 4 queries + Llama.

    ``decoder_only=False`` builds the Flan-T5 variant (a T5 language model), which the
    decoder must refuse.
    """
    from transformers import (
        BlipImageProcessorPil,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
    )

    tokenizer, qformer_tokenizer = tokenizers()
    image_processor = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = InstructBlipProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=NUM_QUERY_TOKENS,
    )
    image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token.content)  # added by the processor
    ids = dict(
        vocab_size=len(tokenizer) + 8,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if decoder_only:
        text = dict(text_config(), model_type="llama", **ids)
    else:
        text = dict(
            model_type="t5",
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=2,
            decoder_start_token_id=tokenizer.pad_token_id,
            **ids,
        )
    # HF's vision init (std 1e-10) and a std-0.02 Q-Former leave the random model blind: its
    # logits would move by less than the tests' tolerance between the real and the noised image.
    config = InstructBlipConfig(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=14,
            initializer_range=0.02,
        ),
        qformer_config=dict(
            vocab_size=len(qformer_tokenizer),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=256,
            cross_attention_frequency=1,
            encoder_hidden_size=32,
            initializer_range=0.2,
            pad_token_id=qformer_tokenizer.pad_token_id,
        ),
        text_config=text,
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token_id,
    )
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration(config)
    # HF initialises the queries to zeros: every image token would then get the same feature.
    torch.nn.init.normal_(model.query_tokens)
    model = finish(model)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor
