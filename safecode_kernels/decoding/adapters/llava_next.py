"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): any-resolution tiling.

The processor resizes each image to the best of ``image_grid_pinpoints``, cuts it into tiles
of the vision tower's size plus one downscaled view, and expands ``<image>`` into as many
tokens as the unpadded tile features (and row-end newlines) take, which depends on the
image's size. ``pixel_values`` is ``[images, tiles, 3, H, W]`` and ``image_sizes`` tells the
model how many tiles of a row are real, so requests with different tile counts share a
batch with zero-padded tiles. The noised view has the real image's size, hence the same
tokens (the decoder checks it); positions are plain 1-D, as for LLaVA-1.5.
"""

from __future__ import annotations

from .base import ModelAdapter


class LlavaNextAdapter(ModelAdapter):
    model_types = ("llava_next",)
    family = "llava"
    model_class_names = ("LlavaNextForConditionalGeneration",)
    padded_keys = ("pixel_values",)  # tiles beyond image_sizes' count are never read
    # Vicuna and Mistral end a turn with their EOS </s>; the Yi-34B and Qwen checkpoints with
    # <|im_end|>, the Llama-3 ones with <|eot_id|>.
    end_of_turn_tokens = ("<|im_end|>", "<|eot_id|>")
