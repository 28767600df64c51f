"""InstructBLIP (``InstructBlipForConditionalGeneration``) with a decoder-only language model.

The vision tower's patches go through a Q-Former whose ``num_query_tokens`` learned queries
read both the image and the prompt (tokenized a second time, by the processor's
``qformer_tokenizer``, into ``qformer_input_ids`` / ``qformer_attention_mask``); their outputs
become the image tokens. Quirks:

- The processor puts the ``<image>`` tokens in front of the tokenized text itself: prompts
  carry no placeholder, and there is no text before the image to share (prefix length 0).
- The Q-Former inputs follow the rows like the pixels and differ in length between requests;
  they are zero-padded on the right, and a masked Q-Former token changes no query's output.
- The wrapper's ``forward`` always runs the vision tower and the Q-Former, so forwards without
  pixels (decoding steps) go straight to ``model.language_model`` (``text_only_model``), which
  embeds the text tokens with the same embedding the wrapper uses. The wrapper's signature is
  only ``**kwargs`` for the language model's arguments, so the cache argument's name comes
  from the language model's.
- Positions are plain 1-D (Llama/Vicuna), as for LLaVA.
- The Flan-T5 variants (an encoder-decoder language model) are not supported.
"""

from __future__ import annotations

from .base import ModelAdapter


class InstructBlipAdapter(ModelAdapter):
    model_types = ("instructblip",)
    family = "instructblip"
    model_class_names = ("InstructBlipForConditionalGeneration",)
    padded_keys = ("qformer_input_ids", "qformer_attention_mask")
    placeholder_in_prompt = False

    @classmethod
    def check_model(cls, model) -> None:
        config = model.config
        if not getattr(config, "use_decoder_only_language_model", True):
            text_type = getattr(config.get_text_config(), "model_type", "?")
            raise ValueError(
                f"{type(model).__name__} has an encoder-decoder language model ({text_type}, as in the "
                f"InstructBLIP Flan-T5 checkpoints): SafeCoDeDecoder supports InstructBLIP only with a "
                f"decoder-only language model (Vicuna / Llama)"
            )
        super().check_model(model)

    @staticmethod
    def text_only_model(model):
        # The wrapper always runs the vision tower and the Q-Former; its language model embeds
        # text tokens with the same embedding and takes the same keyword arguments.
        return getattr(model, "language_model", model)

    @property
    def image_token(self) -> str:
        token = self.processor.image_token  # an AddedToken
        return getattr(token, "content", token)
