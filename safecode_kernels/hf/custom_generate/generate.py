"""SafeCoDe (Safety-aware Contrastive Decoding) as a Hugging Face ``custom_generate`` method.

Load it with ``model.generate(**inputs, custom_generate=<this folder's parent>,
trust_remote_code=True, verdicts=[...], noised_inputs=...)``. The decoding loop lives in the
``safecode-kernels`` package (``safecode_kernels/hf/generation.py``), which
``requirements.txt`` names; see its ``generate`` for the arguments.
"""

from safecode_kernels.hf.generation import generate

__all__ = ["generate"]
