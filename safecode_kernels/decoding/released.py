"""SafeCoDe as the authors' released code decodes (:class:`~safecode_kernels.ReleasedRecipe`), batched.

Every rule of the recipe runs on the decoder's rows: the phrase ranking is one gather over a
padded phrase table (:func:`~safecode_kernels.ops.phrase_scores.phrase_scores`), the safe
path's scaling one ``where`` over the refusal mask, the draws ``argmax(w / q)`` on the
device; only the per-request choices (the keyword match among ``top_k`` ranked phrases, the
quote-mark rule, the early stop on the decoded prefix) run in Python, on values read with the
step's one device read.
"""

from __future__ import annotations

import dataclasses

import torch

from ..ops.phrase_scores import phrase_scores, phrase_table
from ..ops.step_inputs import seed_from
from ..params import SteeringParams
from ..recipes import ReleasedRecipe
from ..refusal import RefusalVocabulary, _text_tokenizer
from ..verdict import Verdict
from .host_to_device import to_device
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
        self._by_paths: dict = {}  # (paths, device) -> the per-row tensors of _path_tensors
        self._tables: dict = {}  # device -> the phrase table there
        self._device_generator: torch.Generator | None = None  # see _generator
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
        """The steered step of ``requests``, launched on the device without a host read or a
        side effect: the tokens the device can decide (argmax or a draw), the refusal masses,
        and what the host rules need (each unsafe row's ranked phrases, each first safe row's
        two best tokens) are read with the step's other values; ``resolve`` then applies the
        rules and records the forced phrases."""
        recipe, setup = self.recipe, self.setup
        real, noised = setup._ban(real, noised)
        paths = tuple(self.states[i].path for i in requests)
        alpha, factor, unsafe = self._path_tensors(paths, real.device)
        probs = (real.float() - alpha[:, None] * noised.float()).softmax(-1)
        refusal = setup.refusal.mask(probs.shape[1], probs.device)
        scaled = torch.where(refusal, probs * factor[:, None], probs)
        total = scaled.sum(-1, keepdim=True)
        # Renormalise; a row whose mass vanished keeps the contrast (as the released code does).
        modulated = torch.where(total > 0, scaled / total.clamp_min(torch.finfo(torch.float32).tiny), probs)
        before = (probs * refusal).sum(-1)
        after = torch.where(unsafe, before, (modulated * refusal).sum(-1))  # a forced phrase modulates nothing

        first = [not sequences[i] for i in requests]
        tokens = self._draw(modulated, paths, first)
        extra = []
        ranked = UNSAFE in paths
        if ranked:  # every row is ranked (one gather); only the unsafe rows' ranking is used
            scores = phrase_scores(probs, self._table_on(probs.device))
            extra.append(torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, : recipe.top_k])
        quoted = recipe.skip_quote_first and any(f and p == SAFE for f, p in zip(first, paths))
        if quoted:
            extra.append(torch.topk(modulated, min(2, modulated.shape[1])).indices)
        actions = ["forced" if p == UNSAFE else "suppressed" if p == SAFE else "boosted" for p in paths]
        out = SteeredTokens(tokens, before, after, actions, [None] * len(requests), None, extra=extra)
        out.logits = modulated.log() if return_logits else None

        def resolve(chosen: list, values: list) -> list[int]:
            """The step's tokens from the values read: the host rules applied, the forced
            phrases recorded (``out.phrases``) and their remaining ids queued."""
            ranking = values.pop(0) if ranked else None
            best_two = values.pop(0) if quoted else None
            chosen = [int(t) for t in chosen]
            for k, (i, path) in enumerate(zip(requests, paths)):
                if path == UNSAFE:
                    width = len(ranking) // len(requests)
                    j = self._choose_phrase([int(j) for j in ranking[k * width : (k + 1) * width]])
                    forced = self.phrases.ids[j][: setup.steer_steps]
                    self.states[i].forced = forced[1:]
                    chosen[k] = forced[0]
                    out.phrases[k] = self.phrases.texts[j]
                elif quoted and first[k] and path == SAFE:
                    width = len(best_two) // len(requests)
                    top = [int(t) for t in best_two[k * width : (k + 1) * width]]
                    mark = len(top) > 1 and setup.tokenizer.decode([top[0]]).strip() in recipe.quote_marks
                    chosen[k] = top[1] if mark else top[0]
            return chosen

        out.resolve = resolve
        return out

    def _path_tensors(self, paths: tuple[str, ...], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row of ``paths``: the contrast's alpha and the refusal tokens' factor ``[R]``
        fp32 and whether the row is forced ``[R]`` bool, on ``device``, built once per set of
        paths, queued without a host sync (see ``host_to_device.py``)."""
        cache = self._by_paths
        key = (paths, device)
        if key not in cache:
            recipe = self.recipe
            alpha = [recipe.alpha_safe if p == SAFE else recipe.alpha for p in paths]
            factor = [
                recipe.suppress_factor if p == SAFE else 1.0 + recipe.lambda_boost if p == FALLBACK else 1.0
                for p in paths
            ]
            cache[key] = (
                to_device(alpha, torch.float32, device),
                to_device(factor, torch.float32, device),
                to_device([p == UNSAFE for p in paths], torch.bool, device),
            )
        return cache[key]

    def _table_on(self, device) -> torch.Tensor:
        cache = self._tables
        if device not in cache:
            cache[device] = self.phrases.table.to(device)
        return cache[device]

    def _draw(self, p: torch.Tensor, paths: tuple[str, ...], first: list[bool]) -> torch.Tensor:
        """The device's token per row ``[R]`` int64: the argmax of ``p`` (first steps, greedy
        runs; forced rows take theirs on the host), else a draw from ``p`` sharpened by the
        path's temperature. A draw is ``argmax(w / q)`` with ``q ~ Exp(1)``, what
        ``torch.multinomial(w, 1)`` computes after a check of ``w`` that reads it on the host:
        with a generator on the logits' device it draws the same token as the released code's
        call. One draw per row, in row order, as the released code draws per request (a
        ``[R, V]`` draw would take other numbers from the stream). With a CPU generator and
        CUDA logits the draws come from a CUDA generator seeded from it (see :meth:`_generator`),
        so a seeded run samples other tokens on a GPU than on the CPU."""
        tokens = p.argmax(-1)
        recipe = self.recipe
        for k, (path, is_first) in enumerate(zip(paths, first)):
            if is_first or self.greedy or path == UNSAFE:
                continue
            temperature = recipe.safe_temperature if path == SAFE else recipe.fallback_temperature
            weights = ((p[k] + 1e-10).log() / temperature).softmax(-1)
            noise = torch.empty_like(weights).exponential_(1, generator=self._generator(weights.device))
            tokens[k] = (weights / noise).argmax()
        return tokens

    def _generator(self, device: torch.device) -> torch.Generator:
        """The run's generator where it lives on ``device`` (``cuda`` without an index counts
        as any CUDA device); else a generator on ``device`` seeded from it for each draw, on
        the host (so restoring the run's generator replays the draws)."""
        generator = self.setup.generator
        if generator.device.type == device.type and generator.device.index in (None, device.index):
            return generator
        on_device = self._device_generator
        if on_device is None or on_device.device != device:
            on_device = self._device_generator = torch.Generator(device=device)
        return on_device.manual_seed(seed_from(generator))

    def _choose_phrase(self, ranked: list[int]) -> int:
        if self.recipe.prefer_keywords:
            for j in ranked:
                if self.phrases.has_keyword[j]:
                    return j
        return ranked[0]

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
