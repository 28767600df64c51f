"""SafeCoDe as the authors' released code decodes (:class:`~safecode_kernels.ReleasedRecipe`), batched.

Every rule of the recipe runs on the decoder's rows: the phrase ranking is one gather over a
padded phrase table (:func:`~safecode_kernels.ops.phrase_scores.phrase_scores`), the safe
path's scaling one ``where`` over the refusal mask; only the per-request choices (the keyword
match among ``top_k`` ranked phrases, the quote-mark rule, the early stop on the decoded
prefix) run in Python, once per steered request and step.
"""

from __future__ import annotations

import dataclasses

import torch

from ..ops.phrase_scores import phrase_scores, phrase_table
from ..params import SteeringParams
from ..recipes import ReleasedRecipe
from ..refusal import RefusalVocabulary, _text_tokenizer
from ..verdict import Verdict
from .steering import FORCED, PLAIN, STEER, SteeredTokens
from .token_policy import Setup

UNSAFE, FALLBACK, SAFE, NONE = "unsafe", "fallback", "safe", "none"


@dataclasses.dataclass
class _State:
    path: str  # UNSAFE (forced phrase), FALLBACK (boost, no phrase list), SAFE, NONE
    forced: list[int] = dataclasses.field(default_factory=list)  # forced ids still to emit
    steering: bool = True  # still in the steered (or forced) part of the answer
    steered: int = 0  # tokens the steering produced (after the corruption guard)
    saved: list[torch.Tensor] = dataclasses.field(default_factory=list)  # real logits of the first steps


class Phrases:
    """The recipe's phrases encoded with one tokenizer: the id lists, the padded table of the
    phrases that encode to at least one id, and which of those contain a keyword."""

    def __init__(self, recipe: ReleasedRecipe, tokenizer):
        tok = _text_tokenizer(tokenizer)
        encoded = [[int(i) for i in tok.encode(p, add_special_tokens=False)] for p in recipe.phrase_list]
        # Phrases that encode to nothing are not ranked (as in the released code).
        kept = [j for j, ids in enumerate(encoded) if ids]
        self.texts = [recipe.phrase_list[j] for j in kept]
        self.ids = [encoded[j] for j in kept]
        self.table = phrase_table(self.ids)
        self.has_keyword = [any(k in text.lower() for k in recipe.keywords) for text in self.texts]
        # The refusal token set: every id of every phrase (special ids included, as released).
        self.refusal = RefusalVocabulary(i for ids in encoded for i in ids)


def released_refusal(recipe: ReleasedRecipe, tokenizer) -> RefusalVocabulary:
    """The released recipe's refusal token set: the union of the ids of all its phrases, each
    encoded once without special tokens (with Llama-family tokenizers ``"It is not</s>"`` adds
    the end-of-sequence id, as in the released code)."""
    return Phrases(recipe, tokenizer).refusal


class ReleasedSteering:
    """The released recipe's per-request decisions; see :class:`ReleasedRecipe` for the rules.

    ``sampling``: ``None`` for greedy everywhere (``do_sample=False``), else the caller's
    ``(temperature, top_k, top_p)`` where set (``None`` entries take the recipe's
    per-verdict continuation values). ``caller_limits``: whether the caller set the length of
    (other, unsafe) answers; the recipe's caps apply to the rest.
    """

    #: :meth:`steer` reads its rows on the host (the phrase ranking, the quote-mark rule) and
    #: keeps state: the decoder drops bad rows before calling it.
    defers_reads = False

    def __init__(
        self,
        setup: Setup,
        recipe: ReleasedRecipe,
        phrases: Phrases,
        family: str,
        sampling: tuple[float | None, int, float | None] | None,
        caller_limits: tuple[bool, bool],
    ):
        self.setup = setup
        self.recipe = recipe
        self.phrases = phrases
        self.family = family
        self.greedy = sampling is None
        self.caller_limits = caller_limits  # whether the caller limited (other, unsafe) answers
        self.extra_columns = setup.steer_steps if recipe.corruption_guard else 0
        steps = setup.steer_steps
        self.states = []
        for request in setup.requests:
            if request.verdict == Verdict.NONE or steps == 0:
                path = NONE
            elif request.verdict == Verdict.UNSAFE and steps >= 2:
                path = UNSAFE if phrases.ids else FALLBACK
            else:  # safe, and unsafe with fewer than two steps (the released code's safe path)
                path = SAFE
            self.states.append(_State(path, steering=path != NONE))
        self._plain = {}
        for verdict_safe in (True, False):
            if self.greedy:
                params = setup.plain_params
            else:
                temperature, top_p = recipe.continuation_safe if verdict_safe else recipe.continuation_other
                t, k, p = sampling
                params = setup.plain_params.replace(
                    temperature=temperature if t is None else t, top_k=k, top_p=top_p if p is None else p
                )
            self._plain[verdict_safe] = params

    # ----- phases ---------------------------------------------------------------------------
    def phase(self, request: int, tokens: list[int]) -> str:
        """Called once at the start and once after every token of ``request``."""
        state = self.states[request]
        if state.steering and tokens:
            state.steering = self._still_steering(state, tokens)
        if not state.steering:
            return PLAIN
        return FORCED if (state.path == UNSAFE and tokens) else STEER

    def _still_steering(self, state: _State, tokens: list[int]) -> bool:
        if state.path == UNSAFE:
            return bool(state.forced)
        if len(tokens) >= self.setup.steer_steps:
            return False
        if state.path == SAFE and self.recipe.early_stop and len(tokens) >= 2:
            words = self.setup.tokenizer.decode(tokens).split()
            if len(words) >= 2 and len(words[0]) >= 2 and words[0][0].isupper():
                return False
        return True

    # ----- steered steps --------------------------------------------------------------------
    def steer(
        self,
        real: torch.Tensor,
        noised: torch.Tensor,
        requests: list[int],
        sequences: list[list[int]],
        return_logits: bool,
    ) -> SteeredTokens:
        recipe, setup = self.recipe, self.setup
        real, noised = setup._ban(real, noised)
        paths = [self.states[i].path for i in requests]
        alpha = torch.tensor(
            [recipe.alpha_safe if p == SAFE else recipe.alpha for p in paths], dtype=torch.float32, device=real.device
        )
        probs = (real.float() - alpha[:, None] * noised.float()).softmax(-1)
        refusal = setup.refusal.mask(probs.shape[1], probs.device)
        factor = torch.tensor(
            [
                recipe.suppress_factor if p == SAFE else 1.0 + recipe.lambda_boost if p == FALLBACK else 1.0
                for p in paths
            ],
            dtype=torch.float32,
            device=probs.device,
        )
        scaled = torch.where(refusal, probs * factor[:, None], probs)
        total = scaled.sum(-1, keepdim=True)
        # Renormalise; a row whose mass vanished keeps the contrast (as the released code does).
        modulated = torch.where(total > 0, scaled / total.clamp_min(torch.finfo(torch.float32).tiny), probs)
        before = (probs * refusal).sum(-1).tolist()
        after = (modulated * refusal).sum(-1).tolist()

        tokens, actions, phrases = [], [], []
        unsafe_rows = [k for k, p in enumerate(paths) if p == UNSAFE]
        ranked = None
        if unsafe_rows:
            scores = phrase_scores(probs[unsafe_rows], self.phrases.table.to(probs.device))
            ranked = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, : recipe.top_k].tolist()
        for k, (i, path) in enumerate(zip(requests, paths)):
            state = self.states[i]
            if path == UNSAFE:
                j = self._choose_phrase(ranked[unsafe_rows.index(k)])
                forced = self.phrases.ids[j][: setup.steer_steps]
                state.forced = forced[1:]
                tokens.append(forced[0])
                actions.append("forced")
                phrases.append(self.phrases.texts[j])
                after[k] = before[k]
                continue
            tokens.append(self._pick(modulated[k], path, first=not sequences[i]))
            actions.append("suppressed" if path == SAFE else "boosted")
            phrases.append(None)
        logits = modulated.log() if return_logits else None
        return SteeredTokens(torch.tensor(tokens, dtype=torch.int64), before, after, actions, phrases, logits)

    def _choose_phrase(self, ranked: list[int]) -> int:
        if self.recipe.prefer_keywords:
            for j in ranked:
                if self.phrases.has_keyword[j]:
                    return j
        return ranked[0]

    def _pick(self, p: torch.Tensor, path: str, first: bool) -> int:
        recipe = self.recipe
        if first:
            if path == SAFE and recipe.skip_quote_first:
                top = torch.topk(p, min(2, p.shape[0])).indices.tolist()
                if len(top) > 1 and self.setup.tokenizer.decode([top[0]]).strip() in recipe.quote_marks:
                    return top[1]
                return top[0]
            return int(p.argmax())
        if self.greedy:
            return int(p.argmax())
        temperature = recipe.safe_temperature if path == SAFE else recipe.fallback_temperature
        weights = ((p + 1e-10).log() / temperature).softmax(-1)
        generator = self.setup.generator
        return int(torch.multinomial(weights.to(generator.device), 1, generator=generator))

    def forced_token(self, request: int, tokens: list[int]) -> int:
        return self.states[request].forced.pop(0)

    # ----- after steering -------------------------------------------------------------------
    def observe(self, request: int, tokens: list[int], real: torch.Tensor) -> None:
        state = self.states[request]
        if self.recipe.corruption_guard and state.steering and len(state.saved) < 2:
            state.saved.append(real.detach().clone())

    def after_steering(self, request: int, tokens: list[int]) -> int | None:
        state = self.states[request]
        keep = len(tokens)
        if self.recipe.corruption_guard:
            text = self.setup.tokenizer.decode(tokens, skip_special_tokens=True)
            if any(marker in text for marker in self.recipe.corruption_markers):
                first = self.setup.tokenizer.decode(tokens[:1], skip_special_tokens=True)
                keep = 0 if "|" in first else 1
        state.steered = min(keep, len(tokens))
        return keep if keep < len(tokens) else None

    def saved_logits(self, request: int, position: int) -> torch.Tensor:
        return self.states[request].saved[position]

    def plain_params(self, request: int) -> SteeringParams:
        return self._plain[self.setup.requests[request].verdict == Verdict.SAFE]

    def max_new_tokens(self, request: int, tokens: list[int]) -> int:
        unsafe = self.setup.requests[request].verdict == Verdict.UNSAFE
        state = self.states[request]
        # The caller's limit counts every new token; the recipe's cap those past the steered prefix.
        if self.caller_limits[unsafe] or state.steering:
            return self.setup.requests[request].max_new_tokens
        return state.steered + self.recipe.length_cap(self.family, unsafe)
