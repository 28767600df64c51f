"""The interface between the architecture-free decoder and one family of HF multimodal models.

An adapter knows how a family lays out its inputs: which token marks the image, which
processor outputs carry the pixels, how positions are counted (1-D for LLaVA, 3-D M-RoPE for
Qwen), and what per-row state must follow the batch when cache rows are selected.
"""

from __future__ import annotations

import inspect

import torch


class ModelAdapter:
    """Base adapter: 1-D positions counted over the attention mask (LLaVA-style).

    Subclasses set ``model_types`` (the ``config.model_type`` values they serve) and
    ``model_class_names`` (for error messages), and override what differs.
    """

    model_types: tuple[str, ...] = ()
    # The family's name in per-family settings (the released recipe's length caps).
    family: str = ""
    model_class_names: tuple[str, ...] = ()
    # Processor outputs that are text, not pixels.
    text_keys = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
    # Vision inputs whose shape (beyond dim 0) may differ between requests; zero is their
    # padding value (a masked Q-Former token, an image tile the model skips, ...), so
    # :meth:`concat_vision` zero-pads them to a common shape. Every other key must agree.
    padded_keys: tuple[str, ...] = ()
    # Whether the prompt text carries the image placeholder (False where the processor adds
    # the image tokens itself, as InstructBLIP's does in front of the text).
    placeholder_in_prompt = True
    # The end-of-turn tokens of the family's chat formats. Answers stop at them even when a
    # checkpoint's generation config names only the end-of-sequence token; else generation runs
    # on into a made-up next turn.
    end_of_turn_tokens: tuple[str, ...] = ()

    @classmethod
    def check_model(cls, model) -> None:
        """Raise ``ValueError`` when ``model`` cannot generate (e.g. a base model without a head)."""
        if getattr(cls.text_only_model(model), "lm_head", None) is None:
            raise ValueError(
                f"{type(model).__name__} has no language-model head: pass the generation model "
                f"({' or '.join(cls.model_class_names)})"
            )

    def __init__(self, model, processor):
        self.model = model
        self.processor = processor
        # What runs forwards without pixels (decoding steps, the text prefix).
        self.text_model = self.text_only_model(model)
        params = inspect.signature(self.text_model.forward).parameters
        # transformers renamed ``past_key_values`` to ``cache`` after 5.17; accept both.
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.has_logits_to_keep = "logits_to_keep" in params
        # The text model without its LM head, for forwards whose logits nobody reads (the prefix).
        base = getattr(self.text_model, "model", None)
        self.base_model = base if isinstance(base, torch.nn.Module) else None
        if self.base_model is not None:
            base_params = inspect.signature(self.base_model.forward).parameters
            self.base_cache_kwarg = "cache" if "cache" in base_params else "past_key_values"

    @staticmethod
    def text_only_model(model) -> torch.nn.Module:
        """The module for forwards without pixels: the model itself, where it takes them."""
        return model

    # ----- tokens and pixels ------------------------------------------------------------
    @property
    def image_token(self) -> str:
        """The placeholder string the prompt carries (expanded by the processor)."""
        return self.processor.image_token

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def placeholder_ids(self) -> list[int]:
        """Token ids that stand for pixels; the decoders never generate them."""
        return [self.image_token_id]

    def end_of_turn_ids(self, tokenizer) -> frozenset[int]:
        """The ids of :attr:`end_of_turn_tokens` that ``tokenizer`` has as single tokens."""
        ids = set()
        for token in self.end_of_turn_tokens:
            token_id = tokenizer.convert_tokens_to_ids(token)  # the unknown token's id (or None) if absent
            if isinstance(token_id, int) and tokenizer.convert_ids_to_tokens(token_id) == token:
                ids.add(token_id)
        return frozenset(ids)

    @property
    def input_device(self) -> torch.device:
        """Where inputs go: the device of the token embeddings (also under ``device_map``)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config.get_text_config(), "max_position_embeddings", None)

    def vision_inputs(self, encoded) -> dict[str, torch.Tensor]:
        """The pixel-carrying part of one processor output (batch of one image)."""
        dtype = self.model.dtype
        out = {}
        for key, value in encoded.items():
            if key in self.text_keys or not isinstance(value, torch.Tensor):
                continue
            out[key] = value.to(self.input_device, dtype if value.is_floating_point() else None)
        return out

    def concat_vision(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Vision inputs of several images in row order (every tensor concatenated on dim 0;
        those in ``padded_keys`` zero-padded to the largest shape first)."""
        out = {}
        for key in parts[0]:
            tensors = [p[key] for p in parts]
            shapes = {t.shape[1:] for t in tensors}
            if len(shapes) > 1:
                if key not in self.padded_keys:
                    raise RuntimeError(
                        f"{type(self).__name__}: vision input {key!r} differs in shape between "
                        f"requests ({sorted(tuple(s) for s in shapes)}) and has no padding rule"
                    )
                tensors = zero_pad(tensors)
            out[key] = torch.cat(tensors)
        return out

    def token_type_inputs(self, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-token inputs a forward over ``input_ids`` needs (none for LLaVA)."""
        return {}

    # ----- positions --------------------------------------------------------------------
    def prompt_positions(self, input_ids, attention_mask, vision) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions of a padded prompt batch (padding anywhere, masked out) and each row's next position.

        Returns ``(positions, next_position)``: ``positions`` shaped like the model's
        ``position_ids`` for ``input_ids`` (``[rows, L]`` here), ``next_position`` ``[rows]``.
        Padding is skipped, so a row's positions equal those of its unpadded prompt.
        """
        positions = attention_mask.long().cumsum(-1) - 1
        positions = positions.masked_fill(attention_mask == 0, 1)
        return positions, attention_mask.long().sum(-1)

    def slice_positions(self, positions, rows, cols) -> torch.Tensor:
        return positions[rows, cols]

    def step_positions(self, next_position: torch.Tensor) -> torch.Tensor:
        """``position_ids`` for one new token per row."""
        return next_position[:, None]

    def select_rows(self, indices: torch.Tensor, rows: int) -> None:
        """Called whenever the decoder keeps only ``indices`` (int64, on the model's device) of
        its ``rows`` batch rows."""

    # ----- forwards ---------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, vision=None, logits: bool = True):
        """Next-token logits ``[rows, V]`` of a forward over ``input_ids`` (a chunk or one token).

        ``logits=False`` only fills ``cache`` (the LM head is skipped where the model has a
        separate base model) and returns ``None``.
        """
        kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if vision:
            kwargs.update(vision)
            kwargs.update(self.token_type_inputs(input_ids))
        if not logits and not vision and self.base_model is not None and cache is not None:
            kwargs[self.base_cache_kwarg] = cache
            self.base_model(use_cache=True, **kwargs)
            return None
        if cache is not None:
            kwargs[self.cache_kwarg] = cache
        kwargs["use_cache"] = cache is not None
        if self.has_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        out = (self.model if vision else self.text_model)(**kwargs).logits[:, -1, :]
        return out if logits else None

    def full_forward(self, input_ids, vision) -> torch.Tensor:
        """Logits ``[1, V]`` of one unpadded sequence, no cache, the model's own positions."""
        kwargs = dict(input_ids=input_ids, use_cache=False, **vision, **self.token_type_inputs(input_ids))
        if self.has_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        return self.model(**kwargs).logits[:, -1, :]


def zero_pad(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` zero-padded at the end of every dim but the first to their largest shape."""
    shape = [max(sizes) for sizes in zip(*(t.shape[1:] for t in tensors))]
    padded = []
    for t in tensors:
        if list(t.shape[1:]) == shape:
            padded.append(t)
            continue
        out = t.new_zeros((t.shape[0], *shape))
        out[(slice(None), *(slice(0, n) for n in t.shape[1:]))] = t
        padded.append(out)
    return padded
