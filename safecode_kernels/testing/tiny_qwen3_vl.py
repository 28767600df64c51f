"""A tiny Qwen3-VL built offline where the installed transformers has it; see tiny_models.py."""

from __future__ import annotations

import functools

from .tiny_models import tiny_qwen


def qwen3_vl_classes():
    """``(config, model, processor)`` classes of Qwen3-VL; skips the test where transformers lacks them."""
    import transformers

    names = ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor")
    if not all(hasattr(transformers, name) for name in names):
        import pytest  # only the tests build this family; pytest is not a runtime dependency

        pytest.skip(f"transformers {transformers.__version__} has no Qwen3-VL")
    return tuple(getattr(transformers, name) for name in names)


@functools.cache
def tiny_qwen3_vl():
    """Qwen3-VL: patches of 16, interleaved M-RoPE, DeepStack features added to the first text
    layers; 4 image tokens for a 64x64 image."""
    from transformers import Qwen2VLImageProcessorPil

    config_class, model_class, processor_class = qwen3_vl_classes()
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    return tiny_qwen(
        config_class,
        model_class,
        processor_class,
        text=dict(model_type="qwen3_vl_text", head_dim=16, rope_parameters=rope),
        vision=dict(
            depth=2,
            hidden_size=32,
            out_hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=16,
            deepstack_visual_indexes=[0],
        ),
        # 64x64 images -> 4x4 patches of 16 -> 2x2 merged = 4 image tokens.
        image_processor=Qwen2VLImageProcessorPil(patch_size=16, min_pixels=64 * 64, max_pixels=64 * 64),
    )
