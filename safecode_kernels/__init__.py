"""safecode-kernels: fused Safety-aware Contrastive Decoding (SafeCoDe) for multimodal LLMs."""

from .decoding import (
    GenerationResult,
    SafeCoDeDecoder,
    SafeCoDeLogitsProcessor,
    SteeringRecord,
    make_noised_image,
    naive_safecode_generate,
    safecode_generate,
    two_cache_safecode_generate,
)
from .ops.step import StepOutput, safecode_step
from .ops.step_inputs import StepError
from .params import SteeringParams, probability_weights_to_logit_biases
from .recipes import ReleasedRecipe
from .refusal import RefusalVocabulary
from .verdict import Verdict

__version__ = "0.1.0"

__all__ = [
    "GenerationResult",
    "RefusalVocabulary",
    "ReleasedRecipe",
    "SafeCoDeDecoder",
    "SafeCoDeLogitsProcessor",
    "SteeringRecord",
    "StepError",
    "StepOutput",
    "SteeringParams",
    "Verdict",
    "make_noised_image",
    "naive_safecode_generate",
    "probability_weights_to_logit_biases",
    "safecode_generate",
    "safecode_step",
    "two_cache_safecode_generate",
]
