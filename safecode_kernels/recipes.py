"""The two SafeCoDe recipes (docs/design.md §8): ``"paper"`` and the authors' released code.

- ``recipe="paper"`` (the default of :class:`~safecode_kernels.SafeCoDeDecoder`) is SafeCoDe as
  the paper describes it: every steered step runs the fused step op
  (:func:`~safecode_kernels.safecode_step`): the contrast, the top-k sensitive set, an additive
  refusal bias. Its parameters are a :class:`~safecode_kernels.SteeringParams`.
- ``recipe="released"`` (or a :class:`ReleasedRecipe`) decodes as the authors' released code
  does (github ``franciscoliu/SafeCoDe``, ``safecode/utils.py``,
  ``contrastive_decode_multistep_with_modulation``): an unsafe verdict forces the start of a
  refusal phrase chosen by its contrastive probability; a safe verdict scales down every refusal
  token's probability; plus the smaller rules listed on :class:`ReleasedRecipe`, each a switch.

Example::

    decoder = sk.SafeCoDeDecoder(model, processor, steer_steps=5, recipe="released")
    decoder = sk.SafeCoDeDecoder(model, processor, recipe=sk.ReleasedRecipe(early_stop=False))
"""

from __future__ import annotations

import dataclasses
import math

#: The refusal phrase list of the released code (``safecode/prompt.py``), verbatim and in its
#: order, duplicates included: the released code ranks every entry, so a duplicate takes a place
#: among the top ``top_k`` phrases. ``"It is not</s>"`` is kept as written: with Llama-family
#: tokenizers ``</s>`` encodes to the end-of-sequence id even without special tokens, so that id
#: joins the refusal token set; with Qwen's byte-level BPE it is ordinary text.
RELEASED_CODE_PHRASE_LIST: tuple[str, ...] = (
    "I'm sorry",
    "I am sorry",
    "I'm an",
    "I'm just",
    "Sorry",
    "I apologize",
    "As an",
    "As an AI",
    "As a language model",
    "As an Assistant",
    "I cannot",
    "I do not",
    "It is not</s>",
    "It is not appropriate",
    "I'm unable to",
    "I am unable to",
    "I am not allowed to",
    "I am an AI language model",
    "It is not</s>",
    "I\u2019m unable to",
    "I am unable to",
    "I am not allowed to",
    "I am an AI language model",
    "Hello",
    "I",
    "Sorry",
    "cannot",
    "apologize",
    "inappropriate",
)

#: The keywords the released code looks for in a ranked phrase to prefer it. It lower-cases the
#: phrase but not the keyword, so ``"As an AI"`` (with capitals) can never match: kept as is.
RELEASED_CODE_KEYWORDS: tuple[str, ...] = (
    "sorry",
    "apologize",
    "unable",
    "cannot",
    "can't",
    "not allowed",
    "As an AI",
    "not able to",
)

#: First tokens the released code skips on a safe verdict (compared after ``strip()``).
RELEASED_CODE_QUOTE_MARKS: frozenset[str] = frozenset({'"', "'", "\u201c", "\u201d", "\u2018", "\u2019", "`", "\u00b4"})

#: Substrings of the steered prefix that the released code takes for a corrupted start.
RELEASED_CODE_CORRUPTION_MARKERS: tuple[str, ...] = ("|", "$", "MS")

#: New tokens after the steered prefix, by model family, as ``(unsafe, other verdicts)``: what the
#: released code generates when the caller gives no limit. Its InstructBLIP and IDEFICS branches
#: set 100 and 200 for unsafe answers but overwrite the limit with 1024 before generating (IDEFICS
#: as a total length); 1024 is what runs, so 1024 is used here.
RELEASED_CODE_LENGTH_CAPS: dict[str, tuple[int, int]] = {
    "llava": (20, 256),
    "qwen": (30, 256),
    "instructblip": (1024, 1024),
    "idefics": (1024, 1024),
}


@dataclasses.dataclass(frozen=True)
class ReleasedRecipe:
    """SafeCoDe as the authors' released code decodes; every rule is a documented switch.

    With ``p = softmax(zr - alpha_v * zn)`` at a steered step (``zr``, ``zn``: the real and the
    noised branch's next-token logits; fp32):

    - **unsafe** verdict (with ``steer_steps >= 2``; with fewer the released code takes the
      safe path): at the first step only, every phrase of ``phrases`` is scored by the sum of
      ``p`` over its token ids (encoded once, without special tokens; ids outside the
      vocabulary add nothing); phrases are ranked by score (stable: list order breaks ties) and
      the first ``top_k`` kept; the first of them whose lower-cased text contains one of
      ``keywords`` wins, else the top one (``prefer_keywords=False``: always the top one). Its
      first ``steer_steps`` token ids are **forced** as the start of the answer; the noised
      branch is dropped after that one step. With no phrase to rank (an empty list), every
      refusal token's probability is multiplied by ``1 + lambda_boost`` and renormalised: the
      first step takes the argmax, later steps sample at temperature ``fallback_temperature``.
    - **safe** verdict: ``alpha_v = alpha * safe_alpha_factor``; the probability of **every**
      refusal token is multiplied by ``1 - 0.5 * lambda_supp`` and the row renormalised. The
      first step takes the most probable token, or the second one when the first decodes
      (stripped) to a quote mark (``skip_quote_first``); later steps sample from
      ``softmax(log(p + 1e-10) / safe_temperature)``. Steering stops early once the decoded
      prefix has two words or more, the first of at least two characters starting with a
      capital (``early_stop``).
    - **none** (the package's "not steered"): plain decoding under both recipes. The released
      code has no such verdict; it sends every verdict other than exactly ``"unsafe"`` down the
      safe path.
    - **after steering** (``corruption_guard``): when the decoded steered prefix contains one of
      ``corruption_markers``, only its first token is kept (none when that token itself
      contains ``"|"``) and the answer goes on from there.
    - **the continuation** samples at ``(temperature, top_p)`` = ``continuation_safe`` after a
      safe verdict and ``continuation_other`` otherwise, unless the caller sets them; with no
      ``max_new_tokens`` it stops after ``length_caps[family]`` new tokens past the steered
      prefix (see :data:`RELEASED_CODE_LENGTH_CAPS`).

    ``do_sample=False`` in :meth:`SafeCoDeDecoder.generate` makes every sampled step of the
    recipe greedy (argmax), for tests and reproducible runs; the released code always samples.
    The refusal token set is the union of the ids of all ``phrases`` (each encoded once, without
    special tokens, as the released code does), unless the decoder is given ``refusal=``.
    Defaults: ``alpha``, ``top_k``, ``lambda_boost``, ``lambda_supp`` are the released code's
    command-line defaults (its function's own defaults differ: 0.8, 10, 2.0, 2.0); every other
    default is a constant of the released code.

    Raises ``ValueError``/``TypeError`` for out-of-range or mistyped fields.
    """

    alpha: float = 0.3
    top_k: int = 20
    lambda_boost: float = 1.0
    lambda_supp: float = 1.0
    phrases: tuple[str, ...] | None = None  # None: RELEASED_CODE_PHRASE_LIST
    keywords: tuple[str, ...] = RELEASED_CODE_KEYWORDS
    prefer_keywords: bool = True
    safe_alpha_factor: float = 0.5
    safe_temperature: float = 0.8
    fallback_temperature: float = 0.7
    skip_quote_first: bool = True
    quote_marks: frozenset[str] = RELEASED_CODE_QUOTE_MARKS
    early_stop: bool = True
    corruption_guard: bool = True
    corruption_markers: tuple[str, ...] = RELEASED_CODE_CORRUPTION_MARKERS
    continuation_safe: tuple[float, float] = (0.8, 0.9)
    continuation_other: tuple[float, float] = (0.7, 0.85)
    length_caps: dict[str, tuple[int, int]] | None = None  # None: RELEASED_CODE_LENGTH_CAPS

    def __post_init__(self) -> None:
        for name in ("alpha", "lambda_boost", "lambda_supp", "safe_alpha_factor"):
            _check_number(name, getattr(self, name), low=0.0)
        if self.lambda_supp > 2.0:
            raise ValueError(
                f"lambda_supp must be in [0, 2] (the factor 1 - 0.5*lambda_supp would be negative), "
                f"got {self.lambda_supp}"
            )
        for name in ("safe_temperature", "fallback_temperature"):
            _check_number(name, getattr(self, name), low=0.0, low_open=True)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {self.top_k!r}")
        for name in ("phrases", "keywords", "corruption_markers"):
            value = getattr(self, name)
            if value is None and name == "phrases":
                continue
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"{name} must be a sequence of strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        for name in ("continuation_safe", "continuation_other"):
            temperature, top_p = getattr(self, name)
            _check_number(f"{name} temperature", temperature, low=0.0, low_open=True)
            _check_number(f"{name} top_p", top_p, low=0.0, high=1.0, low_open=True)
        caps = self.length_caps
        if caps is not None:
            for family, pair in caps.items():
                if len(pair) != 2 or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in pair):
                    raise ValueError(f"length_caps[{family!r}] must be two ints >= 1 (unsafe, other), got {pair!r}")

    @property
    def phrase_list(self) -> tuple[str, ...]:
        return RELEASED_CODE_PHRASE_LIST if self.phrases is None else self.phrases

    @property
    def alpha_safe(self) -> float:
        return self.alpha * self.safe_alpha_factor

    @property
    def suppress_factor(self) -> float:
        """What a safe verdict multiplies each refusal token's probability by."""
        return 1.0 - 0.5 * self.lambda_supp

    def length_cap(self, family: str, unsafe: bool) -> int:
        """New tokens after the steered prefix when the caller gives no limit."""
        caps = RELEASED_CODE_LENGTH_CAPS if self.length_caps is None else self.length_caps
        if family not in caps:
            raise ValueError(
                f"no released-code length cap for model family {family!r}: give max_new_tokens "
                f"or ReleasedRecipe(length_caps={{{family!r}: (unsafe, other)}})"
            )
        return caps[family][0 if unsafe else 1]


#: The names ``recipe=`` accepts.
RECIPES = ("paper", "released")


def resolve_recipe(recipe) -> str | ReleasedRecipe:
    """``"paper"``, or the :class:`ReleasedRecipe` that ``recipe`` names (``"released"``: the
    defaults). Raises ``ValueError``/``TypeError`` naming the accepted values."""
    if isinstance(recipe, ReleasedRecipe):
        return recipe
    if isinstance(recipe, str):
        name = recipe.strip().lower()
        if name == "paper":
            return "paper"
        if name == "released":
            return ReleasedRecipe()
        raise ValueError(f"unknown recipe {recipe!r}: expected 'paper', 'released' or a ReleasedRecipe")
    raise TypeError(f"recipe must be 'paper', 'released' or a ReleasedRecipe, got {type(recipe).__name__}")


def _check_number(name, value, low=None, high=None, low_open=False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
