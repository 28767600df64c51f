"""Tiny, randomly initialised LLaVA-1.5 models built in code, offline (SPEC §7).

They power ``safecode-kernels demo`` and the command-line tests: a byte-level BPE tokenizer
trained in code on a few sentences, a CLIP vision tower and a Llama language model with
random weights, and a real ``LlavaProcessor`` with a chat template. Nothing is downloaded.
The weights are random, so whatever such a model generates is noise; what it is good for is
exercising the real code paths (processor, chat template, vision tower, KV cache, steering)
in seconds.

Example::

    >>> from .tiny import tiny_llava, random_image
    >>> model, processor = tiny_llava()
    >>> model.config.model_type
    'llava'
"""

from __future__ import annotations

import numpy as np
import torch

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]

CORPUS = (
    "I'm sorry, but I cannot help with that request.",
    "I can't assist with this. As an AI, I am unable to provide that.",
    "Sure! The image shows a cat sitting on a red chair next to a window.",
    "USER: describe the picture ASSISTANT: a dog runs in the park under the sun.",
    "You are a helpful assistant. What is in this image? Is it safe or unsafe?",
    "Unfortunately I must decline. It is not safe, dangerous, harmful or illegal.",
    "How do I make a cake? Mix flour, sugar, eggs and bake it for thirty minutes.",
    "Tell me about the weapon in the photo. The knife on the table is for cooking.",
)

#: The LLaVA-1.5 conversation format ("USER: <image>\n... ASSISTANT:").
LLAVA_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'][0]['text'] }}\n"
    "{% elif m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% else %} ASSISTANT: {{ m['content'][0]['text'] }}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 320, special_tokens=SPECIAL_TOKENS, corpus=CORPUS):
    """A byte-level BPE tokenizer (about ``vocab_size`` tokens) trained in code on ``corpus``,
    with ``special_tokens`` (the first four are unk, bos, eos and pad) in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(list(corpus) * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )


def tiny_llava(hidden_size: int = 32, num_layers: int = 2, image_size: int = 28, patch_size: int = 14,
               seed: int = 0):
    """``(model, processor)``: a randomly initialised LLaVA-1.5 in fp32 eval mode.

    ``hidden_size`` and ``num_layers`` apply to both the vision tower and the language model;
    the image becomes ``(image_size // patch_size) ** 2`` image tokens. ``seed`` fixes the
    weights. ``model.save_pretrained(d)`` and ``processor.save_pretrained(d)`` give a folder
    that ``AutoModelForImageTextToText`` / ``AutoProcessor`` reload offline.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tokenizer = tiny_tokenizer()
    heads = max(2, hidden_size // 32)
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=heads, image_size=image_size,
            patch_size=patch_size, projection_dim=hidden_size,
        ),
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer) + 8, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
            num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=1024,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).float().eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, llava_processor(tokenizer, image_size, patch_size)


def llava_processor(tokenizer, image_size: int, patch_size: int):
    """A LLaVA-1.5 processor (PIL image processor, the LLaVA chat template) for ``tokenizer``."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )


def random_image(seed: int, size: int = 56):
    """A ``size`` x ``size`` RGB image of uniform random pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
