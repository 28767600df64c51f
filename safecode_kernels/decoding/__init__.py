"""SafeCoDe generation with Hugging Face multimodal models (docs/design.md §3).

- :class:`SafeCoDeDecoder` / :func:`safecode_generate`: the fused two-branch decoder.
- :func:`naive_safecode_generate`: the no-cache oracle; :func:`two_cache_safecode_generate`:
  the sequential two-cache baseline.
- :class:`SafeCoDeLogitsProcessor`: a drop-in for code that already has both logit rows.
- :func:`make_noised_image`: the noised view of an image.
"""

from .adapters import ModelAdapter, get_adapter, supported_models
from .baselines.naive import naive_safecode_generate
from .baselines.two_cache import two_cache_safecode_generate
from .decoder import SafeCoDeDecoder, safecode_generate
from .kv_cache import cache_nbytes
from .logits_processor import SafeCoDeLogitsProcessor
from .noise import make_noised_image
from .results import GenerationResult, SteeringRecord

__all__ = [
    "GenerationResult",
    "ModelAdapter",
    "SafeCoDeDecoder",
    "SafeCoDeLogitsProcessor",
    "SteeringRecord",
    "cache_nbytes",
    "get_adapter",
    "make_noised_image",
    "naive_safecode_generate",
    "safecode_generate",
    "supported_models",
    "two_cache_safecode_generate",
]
