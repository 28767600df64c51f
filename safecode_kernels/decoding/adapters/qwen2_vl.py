"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: 3-D M-RoPE positions, ``mm_token_type_ids``, ``rope_deltas``.

Image tokens get (temporal, height, width) positions from ``get_rope_index``; text after the
image continues from the largest image position, so a row's next position is not its length.
``rope_deltas`` (next position minus length) is what the model keeps to continue on its own;
we pass explicit positions to every forward, and keep the model's copy in step with the rows.
Qwen3-VL differs only inside the model (interleaved M-RoPE sections, DeepStack vision features
added to the first text layers at the image tokens' places); its inputs and positions are the same.
"""

from __future__ import annotations

import torch

from .base import ModelAdapter


class Qwen2VLAdapter(ModelAdapter):
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    family = "qwen"
    model_class_names = (
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
        "Qwen3VLForConditionalGeneration",
    )
    # ChatML ends each turn with <|im_end|>; <|endoftext|> ends a document.
    end_of_turn_tokens = ("<|im_end|>", "<|endoftext|>")

    @property
    def _inner(self):
        return getattr(self.model, "model", self.model)

    @property
    def placeholder_ids(self):
        return [int(self.model.config.image_token_id), int(self.model.config.video_token_id)]

    def token_type_inputs(self, input_ids):
        # 1 marks image tokens, 2 video tokens; without it Qwen falls back to 1-D positions.
        config = self.model.config
        types = torch.zeros_like(input_ids)
        types[input_ids == config.image_token_id] = 1
        types[input_ids == config.video_token_id] = 2
        return {"mm_token_type_ids": types}

    def prompt_positions(self, input_ids, attention_mask, vision):
        positions, _ = self._inner.get_rope_index(
            input_ids=input_ids,
            mm_token_type_ids=self.token_type_inputs(input_ids)["mm_token_type_ids"],
            image_grid_thw=vision.get("image_grid_thw"),
            attention_mask=attention_mask,
        )
        positions = positions.masked_fill(attention_mask[None] == 0, 0)
        next_position = positions.amax(dim=(0, 2)) + 1
        self._set_rope_deltas(next_position - attention_mask.long().sum(-1))
        return positions, next_position

    def slice_positions(self, positions, rows, cols):
        return positions[:, rows, cols]

    def step_positions(self, next_position):
        return next_position[None, :, None].expand(3, -1, 1)

    def select_rows(self, indices, rows):
        deltas = self._inner.rope_deltas
        if deltas is not None and deltas.shape[0] == rows:  # set for this batch's rows
            self._inner.rope_deltas = deltas[indices.to(deltas.device)]

    def _set_rope_deltas(self, deltas: torch.Tensor) -> None:
        self._inner.rope_deltas = deltas[:, None]
