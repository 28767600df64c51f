"""SafeCoDe as a Hugging Face ``custom_generate`` method.

:data:`CUSTOM_GENERATE_DIR` is a folder holding ``custom_generate/generate.py`` and
``custom_generate/requirements.txt``, the layout ``transformers`` loads::

    out = model.generate(**inputs, custom_generate=sk_hf.CUSTOM_GENERATE_DIR, trust_remote_code=True,
                         verdicts=["unsafe", "safe"], noised_inputs=noised_inputs,
                         tokenizer=processor.tokenizer, max_new_tokens=64)

The method itself is :func:`safecode_kernels.hf.generation.generate` (also callable directly,
as ``generate(model, **inputs, verdicts=...)``); ``custom_generate/generate.py`` only imports it.
"""

from __future__ import annotations

import os

from .generation import generate

#: The folder to pass as ``custom_generate=`` (it contains ``custom_generate/generate.py``).
CUSTOM_GENERATE_DIR: str = os.path.dirname(os.path.abspath(__file__))


__all__ = ["CUSTOM_GENERATE_DIR", "generate"]
