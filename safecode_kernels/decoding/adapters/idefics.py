"""Idefics2 and Idefics3: images split into a variable number of sub-images, padded per batch.

Both families cut an image into sub-images (Idefics2: 4 quarters + the whole image; Idefics3:
a grid of tiles that grows with the image + a downscaled overview), encode each with a SigLIP
tower, and write the features into the ``<image>`` tokens (Idefics2 through a perceiver
resampler, Idefics3 through a pixel shuffle). The processor returns ``pixel_values``
``[1, sub-images, 3, H, W]`` and ``pixel_attention_mask`` ``[1, sub-images, H, W]``; sub-images
smaller than ``H x W`` (Idefics2 keeps each one's own size) are zero-padded at the bottom right
and masked out. So requests may differ in the number of sub-images and in ``H, W``, and a batch
pads them the way the processor pads its own batches: zero pixels, ``False`` mask. The model
skips sub-images whose pixels are all zero ("padding images") and masks padded patches.

The text is plain 1-D-position text (Mistral / Llama), so positions are counted over the mask
as for LLaVA. The processor opens the first sub-image with ``<fake_token_around_image>`` (and
Idefics3 with ``<row_1_col_1>`` or ``<global-img>``) before its first ``<image>`` token: text
that does not depend on the pixels, so even a prompt that starts with the image has a shared
prefix of one or two tokens; the later tile tags and separators are in the per-branch suffix.
The released Idefics2 keeps Mistral's 4096-token sliding window; runs that fit in it attend
as with full attention, and the decoder refuses (with a clear error) runs that do not.
"""

from __future__ import annotations

from .base import ModelAdapter


class IdeficsAdapter(ModelAdapter):
    model_types = ("idefics2", "idefics3")
    family = "idefics"
    model_class_names = ("Idefics2ForConditionalGeneration", "Idefics3ForConditionalGeneration")
    # Sub-image count and size vary per image; zeros are what the processor pads with, and
    # what the model drops (all-zero sub-images) or masks (padded pixels).
    padded_keys = ("pixel_values", "pixel_attention_mask")
    # Each turn of the chat format ends with it ("...<end_of_utterance>\nAssistant:").
    end_of_turn_tokens = ("<end_of_utterance>",)

    # placeholder_ids stays the base's [<image>]: a generated <image> would be taken for an
    # image slot by any later forward (and break the feature count check). The other image
    # tokens (<fake_token_around_image>, <global-img>, <row_i_col_j>) are only ever embedded
    # as text, so generating one breaks nothing: they are not banned.
