"""safecode-kernels: fused Safety-aware Contrastive Decoding (SafeCoDe) for multimodal LLMs."""

from .ops.step import StepOutput, safecode_step
from .ops.step_inputs import StepError
from .params import SteeringParams, probability_weights_to_logit_biases
from .refusal import RefusalVocabulary
from .verdict import Verdict

__version__ = "0.1.0"

__all__ = [
    "RefusalVocabulary",
    "StepError",
    "StepOutput",
    "SteeringParams",
    "Verdict",
    "probability_weights_to_logit_biases",
    "safecode_step",
]
