"""SafeCoDe inside Hugging Face ``generate``: the ``custom_generate`` method's code.

:func:`generate` takes what ``model.generate`` takes (the processor's outputs, a generation
config or its fields, logits processors, stopping criteria, a streamer) plus SafeCoDe's
inputs, and hands a decoding loop to ``GenerationMixin.generate(custom_generate=<callable>)``,
so ``transformers`` itself resolves the generation config, ``max_length``, the EOS and pad
ids, the logits processors and the stopping criteria. The pixels are kept out of that
preparation (some versions run the vision tower there) and go to the loop directly.

The loop (:func:`_decode`) runs both branches as one batch with a KV cache: rows ``0..B-1``
hold the real images, rows ``B..2B-1`` the noised ones, prefilled together; each of the first
``steer_steps`` tokens comes from the logits :func:`~safecode_kernels.safecode_step` modulates
on the paired rows, then the noised rows leave the cache and decoding goes on with the real rows
alone. Forwards, positions (1-D or M-RoPE) and vision inputs go through the package's model
adapters, so the models :class:`~safecode_kernels.SafeCoDeDecoder` supports work here too, with
the same tokens under greedy decoding.

Like the decoder, the loop reads the device once per step (:func:`_read_step`): the step op is
launched without reading its row status words (``ops/step_pending.py``), sampling draws as
``torch.multinomial`` does without its host-side check, and the status words, the check's
outcome, the rows still running (the stop test) and, for a streamer, the tokens come back in
one copy. The model's own forward may read more (transformers' attention-mask helpers do).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import torch

from ..decoding.adapters import ModelAdapter, get_adapter
from ..decoding.host_to_device import to_device
from ..decoding.kv_cache import check_window, new_cache, set_capacity
from ..decoding.requests import resolve_refusal
from ..decoding.small_batch import small_batch_linear
from ..ops.step_pending import finish_step, launch_step
from ..params import SteeringParams
from ..recipes import ReleasedRecipe, resolve_recipe
from ..refusal import RefusalVocabulary, _text_tokenizer
from ..validation import check_int
from ..verdict import Verdict, parse_verdicts

# Tensor arguments that go to ``transformers``' own preparation; every other tensor argument
# is a model input that the loop takes itself (the pixels and what goes with them).
_PASSED_ON = frozenset(
    {"inputs", "input_ids", "attention_mask", "negative_prompt_ids", "negative_prompt_attention_mask"}
)
# Inputs the loop cannot honour: it embeds the ids, counts positions and owns its cache.
_UNSUPPORTED = ("inputs_embeds", "position_ids", "cache_position", "past_key_values", "cache")


@dataclasses.dataclass(frozen=True)
class _Settings:
    """SafeCoDe's side of one call, checked: what :func:`_decode` needs beyond ``generate``'s."""

    adapter: ModelAdapter
    verdicts: tuple[Verdict, ...]
    steer_steps: int
    params: SteeringParams
    refusal: RefusalVocabulary | None
    real: dict[str, torch.Tensor]  # the real images' vision inputs, batch order
    noised: dict[str, torch.Tensor] | None  # the noised images' (None when nothing is steered)
    backend: str


def generate(
    model,
    *args,
    verdicts=None,
    noised_inputs: Mapping | None = None,
    noised_pixel_values: torch.Tensor | None = None,
    steer_steps: int = 5,
    safecode_params: SteeringParams | None = None,
    recipe="paper",
    refusal=None,
    backend: str = "auto",
    **kwargs,
):
    """Generate with SafeCoDe steering; returns what ``model.generate`` returns (the prompt and
    the new tokens ``[B, L + T]``, or a ``GenerateDecoderOnlyOutput`` with
    ``return_dict_in_generate=True``: ``sequences``, and ``scores`` / ``logits`` when asked for).

    Args:
        model: a model :class:`~safecode_kernels.SafeCoDeDecoder` supports (LLaVA-1.5,
            LLaVA-NeXT, Qwen2/2.5/3-VL, InstructBLIP, Idefics2/3).
        *args, **kwargs: what ``model.generate`` takes: the processor's outputs for the real
            images (``input_ids``, ``attention_mask``, ``pixel_values``, ...), ``max_new_tokens``,
            ``do_sample``, ``generation_config``, ``logits_processor``, ``stopping_criteria``,
            ``streamer``, ``tokenizer``, ... Beam search and ``num_return_sequences > 1`` are
            not supported.
        verdicts: one ``"unsafe" | "safe" | "none"`` (or :class:`~safecode_kernels.Verdict`) per row.
        noised_inputs: the processor's output for the noised images with the same texts (only
            its vision inputs are used; its ``input_ids``, when present, must equal the real ones).
        noised_pixel_values: instead of ``noised_inputs``: the noised images' ``pixel_values``
            (every other vision input is taken from the real images').
        steer_steps: how many first tokens are steered (0: plain generation, no noised branch).
        safecode_params: :class:`~safecode_kernels.SteeringParams` of the steered steps (their
            sampling fields are unused: ``generate``'s logits processors and sampler choose
            every token from the modulated logits).
        recipe: ``"paper"`` only; the released code's recipe runs in
            :class:`~safecode_kernels.SafeCoDeDecoder` (``recipe="released"``).
        refusal: the refusal token set (a :class:`~safecode_kernels.RefusalVocabulary` or ids);
            by default built from ``tokenizer=`` (the processor or its tokenizer).
        backend: backend of the step op.

    Placeholder tokens (the image token) are never generated, as in the decoder. Sampling
    (``do_sample=True``) draws with torch's default generator, as ``generate`` does.
    """
    if verdicts is None:
        raise ValueError("SafeCoDe's generate needs verdicts=[...]: one 'unsafe' | 'safe' | 'none' per batch row")
    verdicts = _parse_verdicts(verdicts)
    check_int("steer_steps", steer_steps, 0)
    if safecode_params is None:
        safecode_params = SteeringParams()
    if not isinstance(safecode_params, SteeringParams):
        raise TypeError(f"safecode_params must be a SteeringParams, got {type(safecode_params).__name__}")
    if isinstance(resolve_recipe(recipe), ReleasedRecipe):
        raise NotImplementedError(
            "SafeCoDe's custom generate runs the paper's recipe only; the released code's "
            "recipe runs in safecode_kernels.SafeCoDeDecoder(recipe='released')"
        )
    for name in _UNSUPPORTED:
        if kwargs.get(name) is not None:
            raise ValueError(
                f"SafeCoDe's generate does not take {name}: it runs the prompt itself, with its own positions and cache"
            )
    adapter = get_adapter(model, None)
    vision = {
        k: kwargs.pop(k)
        for k in list(kwargs)
        if isinstance(kwargs[k], torch.Tensor) and k not in _PASSED_ON and not hasattr(model.generation_config, k)
    }
    real = adapter.vision_inputs(vision)  # drops the text-side inputs, which the adapter makes itself
    if not real:
        raise ValueError(
            "SafeCoDe's generate needs the images' vision inputs (pixel_values, ...), as the processor returns them"
        )
    noised = None
    if steer_steps > 0:
        noised = _noised_vision(adapter, real, noised_inputs, noised_pixel_values, kwargs)
        if refusal is None and kwargs.get("tokenizer") is None:
            raise ValueError(
                "SafeCoDe's generate needs the refusal tokens: pass tokenizer=processor.tokenizer (or refusal=...)"
            )
        refusal = resolve_refusal(refusal, kwargs.get("tokenizer"))
    settings = _Settings(
        adapter,
        verdicts,
        steer_steps,
        safecode_params.replace(temperature=0.0, top_k=0, top_p=1.0),
        refusal,
        real,
        noised,
        backend,
    )
    from transformers import GenerationMixin, StoppingCriteriaList, StopStringCriteria

    stop_strings = kwargs.pop("stop_strings", None)
    if stop_strings is not None:  # transformers drops the tokenizer a callable method would need for them
        if kwargs.get("tokenizer") is None:
            raise ValueError("stop_strings need tokenizer=processor.tokenizer")
        stop = StopStringCriteria(_text_tokenizer(kwargs["tokenizer"]), stop_strings)
        kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), stop])
    # transformers hands a callable ``custom_generate`` only the arguments its signature adds to
    # ``_sample``'s, and drops the streamer: both come bound.
    loop = functools.partial(_decode, safecode=settings, streamer=kwargs.get("streamer"))
    return GenerationMixin.generate(model, *args, custom_generate=loop, **kwargs)


def _parse_verdicts(verdicts) -> tuple[Verdict, ...]:
    if isinstance(verdicts, torch.Tensor):
        verdicts = verdicts.tolist()
    if isinstance(verdicts, (str, Verdict)) or not isinstance(verdicts, Sequence):
        raise TypeError(f"verdicts must be a list with one verdict per batch row, got {type(verdicts).__name__}")
    return tuple(parse_verdicts(verdicts))


def _noised_vision(adapter: ModelAdapter, real: dict, noised_inputs, noised_pixel_values, kwargs: dict) -> dict:
    """The noised images' vision inputs, checked against the real ones."""
    if (noised_inputs is None) == (noised_pixel_values is None):
        raise ValueError(
            "steer_steps > 0 needs the noised branch: pass noised_inputs=processor(images=noised_images, "
            "text=<the same texts>, ...) or noised_pixel_values=... (one of them)"
        )
    if noised_pixel_values is not None:
        if not isinstance(noised_pixel_values, torch.Tensor) or "pixel_values" not in real:
            raise TypeError("noised_pixel_values must be a tensor shaped like pixel_values")
        noised = dict(real, **adapter.vision_inputs({"pixel_values": noised_pixel_values}))
    else:
        if not isinstance(noised_inputs, Mapping):
            raise TypeError(
                f"noised_inputs must be the processor's output (a mapping), got {type(noised_inputs).__name__}"
            )
        noised = adapter.vision_inputs(noised_inputs)
        ids = kwargs.get("input_ids", kwargs.get("inputs"))
        noised_ids = noised_inputs.get("input_ids")
        if (
            isinstance(ids, torch.Tensor)
            and isinstance(noised_ids, torch.Tensor)
            and not (ids.shape == noised_ids.shape and torch.equal(ids.cpu(), noised_ids.cpu()))
        ):
            raise ValueError(
                "noised_inputs['input_ids'] differ from input_ids: process the noised images with the "
                "same texts (and padding)"
            )
    if set(noised) != set(real):
        raise ValueError(f"the noised branch's vision inputs {sorted(noised)} differ from the real ones {sorted(real)}")
    for key, tensor in real.items():
        if noised[key].shape != tensor.shape:
            raise ValueError(
                f"the noised {key} is shaped {tuple(noised[key].shape)}, the real one "
                f"{tuple(tensor.shape)}: noise images of the real ones' sizes, with the same texts"
            )
    return noised


def _decode(
    model,
    input_ids,
    logits_processor,
    stopping_criteria,
    generation_config,
    *,
    safecode: _Settings,
    streamer=None,
    **model_kwargs,
):
    """The decoding loop ``GenerationMixin.generate`` calls with its prepared arguments
    (``model_kwargs`` carry the attention mask; the cache, positions and the like it prepares
    are not used)."""
    config, s = generation_config, safecode
    if config.num_beams != 1 or config.num_return_sequences != 1:
        raise ValueError("SafeCoDe's generate supports neither beam search nor num_return_sequences > 1")
    dict_output = config.return_dict_in_generate
    if dict_output and (config.output_attentions or config.output_hidden_states):
        raise NotImplementedError("SafeCoDe's generate returns no attentions or hidden states")
    batch, prompt_len = input_ids.shape
    if len(s.verdicts) != batch:
        raise ValueError(f"got {len(s.verdicts)} verdicts for {batch} batch rows: give one per row")
    adapter, device = s.adapter, s.adapter.input_device
    mask = model_kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    width = 2 if s.steer_steps > 0 else 1  # rows per request: real (and noised while steering)
    ids, mask = input_ids.to(device).repeat(width, 1), mask.to(device).repeat(width, 1)
    vision = adapter.concat_vision([s.real, s.noised]) if width == 2 else s.real
    positions, next_position = adapter.prompt_positions(ids, mask, vision)
    max_length = max(config.max_length, prompt_len + 1)
    cache = new_cache(model, capacity=max_length)
    check_window(cache, max_length)
    if width == 2:  # the noised rows leave after the steered steps: first reserve only what they use
        set_capacity(cache, min(max_length, prompt_len + s.steer_steps))
    # One mask for the run: the prompt's, then a column per new token (each step sees a view).
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], max_length - prompt_len)], dim=1)
    logits = adapter.forward(ids, mask[:, :prompt_len], positions, cache, vision=vision)

    # Built once, queued without a wait; the step op takes the verdicts as valid int8 codes
    # (parse_verdicts made them) without checking them on every step.
    banned = to_device(list(adapter.placeholder_ids), torch.int64, input_ids.device)
    verdicts = to_device([int(v) for v in s.verdicts], torch.int8, input_ids.device)
    if width == 2:  # the refusal mask (its ids checked against the vocabulary) is built here, not in a step
        s.refusal.mask(logits.shape[-1], input_ids.device)
    pad = config._pad_token_tensor
    if pad is not None:
        pad = pad.to(input_ids.device)
    unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
    all_scores, all_logits = [], []
    step = 0
    while True:
        real = logits[:batch].to(copy=True, dtype=torch.float32, device=input_ids.device)
        if dict_output and config.output_logits:
            all_logits.append(real.clone())
        # A generated placeholder would be taken for an image slot: -inf in the real row, and 0
        # in the noised one keeps the contrast -inf (not NaN).
        real.index_fill_(1, banned, float("-inf"))
        pending = None
        if step < s.steer_steps:
            noised = logits[batch:].to(dtype=torch.float32, device=input_ids.device).index_fill(1, banned, 0.0)
            # Its row status words stay on the device: they come back with the step's read.
            pending = launch_step(real, noised, verdicts, s.refusal, s.params, None, s.backend, True, False)
            real = pending.logits
        choice = _choose(real, None, input_ids, unfinished, logits_processor, stopping_criteria, config, pad)
        words, bad_draw, running, streamed = _read_step(
            [
                None if pending is None else pending.status,
                choice.bad_draw,
                choice.unfinished,
                choice.tokens if streamer is not None else None,
            ]
        )
        if words and any(words):  # rare: the step op's error, or rows the Triton merge left undecided
            _, real, _ = finish_step(pending, words)  # raises the error safecode_step raises
            # The recomputed rows' tokens, with the same noise (the same draw), read again; the
            # logits processors and stopping criteria run again on the corrected logits.
            choice = _choose(
                real, choice.noise, input_ids, unfinished, logits_processor, stopping_criteria, config, pad
            )
            bad_draw, running, streamed = _read_step(
                [choice.bad_draw, choice.unfinished, choice.tokens if streamer is not None else None]
            )
        if bad_draw and bad_draw[0]:  # torch.multinomial's errors
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        if bad_draw and bad_draw[1]:
            raise RuntimeError("invalid multinomial distribution (sum of probabilities <= 0)")
        tokens, input_ids, unfinished = choice.tokens, choice.input_ids, choice.unfinished
        if dict_output and config.output_scores:
            all_scores.append(choice.scores)
        if streamer is not None:  # streamers take CPU tokens: these are the values read
            streamer.put(torch.tensor(streamed, dtype=tokens.dtype))
        step += 1
        if not any(running) or input_ids.shape[1] >= max_length:
            break
        if width == 2 and step == s.steer_steps:  # steering is over: drop the noised rows
            keep = torch.arange(batch, device=device)
            set_capacity(cache, max_length)  # the real rows move into buffers with room for the whole answer
            cache.batch_select_indices(keep)
            adapter.select_rows(keep, 2 * batch)
            mask, next_position, width = mask[:batch], next_position[:batch], 1
        # Steered steps run 2B rows: one weight read serves both branches (see small_batch.py).
        # The tokens feed the forward from the device (no host round trip).
        with small_batch_linear(model, enabled=width == 2):
            logits = adapter.forward(
                tokens.to(device).repeat(width)[:, None],
                mask[:, : input_ids.shape[1]],
                adapter.step_positions(next_position),
                cache,
            )
        next_position = next_position + 1

    if streamer is not None:
        streamer.end()
    if not dict_output:
        return input_ids
    from transformers.generation import GenerateDecoderOnlyOutput

    return GenerateDecoderOnlyOutput(
        sequences=input_ids,
        scores=tuple(all_scores) if config.output_scores else None,
        logits=tuple(all_logits) if config.output_logits else None,
    )


@dataclasses.dataclass(frozen=True)
class _Choice:
    """A step's choice, all on the device: ``scores`` ``[B, V]`` (what the logits processors
    made), ``tokens`` ``[B]`` int64 (padding in finished rows), ``input_ids`` with them
    appended, ``unfinished`` ``[B]`` bool after the stopping criteria, and for a sampled step
    the ``noise`` ``[B, V]`` it drew with and ``bad_draw`` ``[2]`` bool, torch.multinomial's
    checks (a probability is inf, NaN or < 0; a row sums to 0); else ``None`` for both."""

    scores: torch.Tensor
    tokens: torch.Tensor
    input_ids: torch.Tensor
    unfinished: torch.Tensor
    noise: torch.Tensor | None
    bad_draw: torch.Tensor | None


def _choose(real, noise, input_ids, unfinished, logits_processor, stopping_criteria, config, pad) -> _Choice:
    """The tokens ``generate``'s sampler picks from ``real`` (the step's real, or modulated,
    logits ``[B, V]`` fp32), without reading the device: greedy, the argmax; sampled, what
    ``torch.multinomial(probs, 1)`` draws, ``argmax(probs / q)`` with ``q ~ Exp(1)`` from the
    device's default generator (the same draw; ``noise`` reuses a ``q`` already drawn),
    without its check of ``probs`` on the host (returned instead, for the step's one read)."""
    scores = logits_processor(input_ids, real)
    bad_draw = None
    if config.do_sample:
        probs = scores.softmax(-1)
        if noise is None:
            noise = torch.empty_like(probs).exponential_(1)
        tokens = (probs / noise).argmax(-1)
        # max is NaN where any value is: NaN < inf is False, as in multinomial's check.
        bad_draw = torch.stack([~((probs.max() < float("inf")) & (probs.min() >= 0)), (probs.sum(-1) == 0).any()])
    else:
        tokens = scores.argmax(-1)
    if pad is not None:  # finished rows go on with padding, as in generate
        tokens = torch.where(unfinished, tokens, pad)
    input_ids = torch.cat([input_ids, tokens[:, None]], dim=-1)
    unfinished = unfinished & ~stopping_criteria(input_ids, scores).to(unfinished.device)
    return _Choice(scores, tokens, input_ids, unfinished, noise, bad_draw)


def _read_step(parts: list) -> list:
    """The step's one blocking device-to-host read (tests count the calls): each 1-D integer or
    bool tensor of ``parts`` as a list of Python ints, ``None`` left as ``None``."""
    tensors = [part for part in parts if part is not None]
    device = tensors[0].device
    # int64 holds every token id, status word and flag exactly.
    values = torch.cat([t.reshape(-1).to(device=device, dtype=torch.int64) for t in tensors]).tolist()
    out, start = [], 0
    for part in parts:
        if part is None:
            out.append(None)
        else:
            out.append(values[start : start + part.numel()])
            start += part.numel()
    return out
