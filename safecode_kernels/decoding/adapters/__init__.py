"""Model adapters: one small class per family holds its quirks; :func:`get_adapter` picks one."""

from __future__ import annotations

from .base import ModelAdapter
from .idefics import IdeficsAdapter
from .instructblip import InstructBlipAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_vl import Qwen2VLAdapter

ADAPTERS: tuple[type[ModelAdapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    Qwen2VLAdapter,
    InstructBlipAdapter,
    IdeficsAdapter,
)


def supported_models() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.model_class_names]


def check_processor(processor) -> None:
    """Raise ``TypeError`` unless ``processor`` is a multimodal processor (one that encodes
    images and text together, with ``.image_processor`` and ``.tokenizer``): a tokenizer or an
    image processor alone would only fail later, deep in the first ``generate``."""
    missing = [name for name in ("image_processor", "tokenizer") if getattr(processor, name, None) is None]
    if missing:
        raise TypeError(
            f"processor must be the model's processor (AutoProcessor.from_pretrained(...)), which has "
            f"{' and '.join(missing)}; got a {type(processor).__name__}"
        )


def get_adapter(model, processor) -> ModelAdapter:
    """The adapter for ``model``; a clear error naming the supported models otherwise."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            adapter.check_model(model)
            if processor is not None:  # None: forwards only (the Hugging Face generate path)
                check_processor(processor)
            return adapter(model, processor)
    raise ValueError(
        f"unsupported model {type(model).__name__} (model_type {model_type!r}); "
        f"SafeCoDeDecoder supports: {', '.join(supported_models())}"
    )


__all__ = [
    "ADAPTERS",
    "IdeficsAdapter",
    "InstructBlipAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "ModelAdapter",
    "Qwen2VLAdapter",
    "get_adapter",
    "supported_models",
]
