"""Checking a batch of (image, prompt, verdict) requests and encoding both branches of each.

Every decoder (the fused one, the naive loop, the two-cache loop) goes through
:func:`prepare`, so all three see identical token ids, pixels and settings. What it returns,
a :class:`~.token_policy.Setup`, also decides each step's tokens: see :mod:`.token_policy`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ..params import SteeringParams
from ..refusal import RefusalVocabulary
from ..validation import check_int, check_requests
from ..verdict import Verdict, parse_verdicts
from .adapters import ModelAdapter, get_adapter
from .noise import as_rgb, noised_views
from .token_policy import Setup


@dataclasses.dataclass
class EncodedRequest:
    """One request, encoded: ``input_ids`` ``[L]`` (the same for both branches), the vision
    inputs of the real and the noised image, and ``prefix_len``, the number of tokens before
    the first image token (identical in both branches, so computable once)."""

    input_ids: torch.Tensor
    real: dict[str, torch.Tensor]
    noised: dict[str, torch.Tensor] | None  # None when no step is steered (steer_steps=0)
    prefix_len: int
    verdict: Verdict
    max_new_tokens: int


def prepare(
    model,
    processor,
    images,
    prompts,
    verdicts,
    *,
    params: SteeringParams | None = None,
    steer_steps: int = 5,
    noise_std: float = 0.1,
    seed: int = 0,
    refusal=None,
    max_new_tokens: int = 256,
    max_new_tokens_unsafe: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    noised_images=None,
    system_prompt: str | Sequence[str | None] | None = None,
    chat_template: bool | None = None,
    eos_token_id=None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    adapter: ModelAdapter | None = None,
    system_prompt_role: str = "system",
    text_before_image: bool = False,
) -> Setup:
    """Check the inputs, build the prompts and noised images, and encode both branches."""
    adapter = adapter or get_adapter(model, processor)
    images, prompts, verdicts = _check_batch(images, prompts, verdicts)
    check_int("steer_steps", steer_steps, 0)
    check_int("max_new_tokens", max_new_tokens, 1)
    if max_new_tokens_unsafe is not None:
        check_int("max_new_tokens_unsafe", max_new_tokens_unsafe, 1)
    if system_prompt_role not in ("system", "user"):
        raise ValueError(f"system_prompt_role must be 'system' or 'user', got {system_prompt_role!r}")
    if isinstance(system_prompt, (list, tuple)) and len(system_prompt) != len(images):
        raise ValueError(f"got {len(system_prompt)} system prompts for {len(images)} requests")
    if noised_images is not None:
        noised_images = _check_noised(noised_images, images)
    elif steer_steps > 0:
        noised_images = noised_views(images, noise_std, seed)
    else:  # no steered step reads a noised branch: neither draw nor process one
        noised_images = [None] * len(images)

    requests = []
    for i, (image, noised, prompt, verdict) in enumerate(zip(images, noised_images, prompts, verdicts)):
        limit = max_new_tokens_unsafe if (verdict == Verdict.UNSAFE and max_new_tokens_unsafe) else max_new_tokens
        system = system_prompt[i] if isinstance(system_prompt, (list, tuple)) else system_prompt
        text = build_prompt(adapter, processor, prompt, system, chat_template, i, system_prompt_role, text_before_image)
        requests.append(_encode(adapter, processor, i, text, image, noised, verdict, limit))

    params = params if params is not None else SteeringParams()
    if not isinstance(params, SteeringParams):
        raise TypeError(f"params must be a SteeringParams, got {type(params).__name__}")
    sampling = _sampling(do_sample, temperature, top_k, top_p)
    tokenizer = getattr(processor, "tokenizer", processor)
    return Setup(
        adapter=adapter,
        tokenizer=tokenizer,
        requests=requests,
        refusal=resolve_refusal(refusal, processor),
        steer_params=params.replace(**sampling),
        plain_params=SteeringParams(alpha=0.0, alpha_safe=0.0, sensitive_top_k=0, boost=0.0, suppress=0.0, **sampling),
        steer_steps=steer_steps,
        eos_ids=eos_ids(eos_token_id, model, tokenizer, adapter),
        pad_id=pad_id(tokenizer),
        generator=generator if generator is not None else torch.Generator().manual_seed(seed),
        backend=backend,
        banned_ids=torch.tensor(adapter.placeholder_ids, dtype=torch.int64),
    )


def build_prompt(
    adapter,
    processor,
    prompt: str,
    system_prompt=None,
    chat_template=None,
    index: int = 0,
    system_prompt_role: str = "system",
    text_before_image: bool = False,
) -> str:
    """The full prompt text of one request, with the image placeholder exactly once (or not
    at all, for processors that put the image tokens in front of the text themselves).

    With a chat template (the processor's, used by default when it has one) ``prompt`` is the
    user's text and the template places the image (before the text, or after it with
    ``text_before_image``); without one (``chat_template=False`` or a processor without a
    template) ``prompt`` is used as is and must contain the placeholder. ``system_prompt``
    goes into a system message (``system_prompt_role="system"``) or opens the user's text
    (``"user"``, joined with a space unless it ends in whitespace, as the released code joins
    its first-person instruction and the request).
    """
    if system_prompt is not None and system_prompt_role == "user":
        sep = "" if system_prompt[-1:].isspace() else " "
        prompt, system_prompt = f"{system_prompt}{sep}{prompt}", None
    template = getattr(processor, "chat_template", None) or getattr(
        getattr(processor, "tokenizer", None), "chat_template", None
    )
    use_template = bool(template) if chat_template is None else chat_template
    if use_template and not template:
        raise ValueError("chat_template=True but the processor has no chat template")
    if use_template:
        messages = []
        if system_prompt is not None:
            messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        content = [{"type": "image"}, {"type": "text", "text": prompt}]
        messages.append({"role": "user", "content": content[::-1] if text_before_image else content})
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        text = prompt if system_prompt is None else f"{system_prompt}\n{prompt}"
    count = text.count(adapter.image_token)
    if not adapter.placeholder_in_prompt:
        if count:
            raise ValueError(
                f"prompt {index} holds the image placeholder {adapter.image_token!r}, but this model's processor "
                f"puts the image tokens in front of the text itself: remove it from the prompt"
            )
    elif count != 1:
        how = (
            "the chat template places it; remove it from the prompt"
            if use_template
            else "without a chat template the prompt must contain it where the image goes"
        )
        raise ValueError(
            f"prompt {index} must hold the image placeholder {adapter.image_token!r} exactly once, "
            f"found {count} ({how})"
        )
    return text


def _encode(adapter, processor, index, text, image, noised, verdict, max_new_tokens) -> EncodedRequest:
    real_enc = processor(images=[image], text=[text], return_tensors="pt")
    noised_enc = real_enc if noised is None else processor(images=[noised], text=[text], return_tensors="pt")
    ids = real_enc["input_ids"][0]
    # Only the pixels may differ between branches; the decoder relies on it.
    if not torch.equal(ids, noised_enc["input_ids"][0]):
        raise RuntimeError(f"request {index}: the processor gave different token ids for the real and the noised image")
    image_positions = (ids == adapter.image_token_id).nonzero()
    if image_positions.numel() == 0:
        raise ValueError(f"request {index}: the encoded prompt has no image tokens (id {adapter.image_token_id})")
    limit = adapter.max_positions
    if limit is not None and ids.numel() + max_new_tokens > limit:
        raise ValueError(
            f"request {index}: the prompt takes {ids.numel()} tokens with the image "
            f"({image_positions.numel()} image tokens), leaving no room for max_new_tokens={max_new_tokens} "
            f"within the model's {limit} positions; shorten the prompt or lower max_new_tokens"
        )
    return EncodedRequest(
        input_ids=ids,
        real=adapter.vision_inputs(real_enc),
        noised=adapter.vision_inputs(noised_enc) if noised is not None else None,
        prefix_len=int(image_positions[0, 0]),
        verdict=verdict,
        max_new_tokens=max_new_tokens,
    )


def _check_batch(images, prompts, verdicts):
    images, prompts = check_requests(images, prompts, verdicts)
    if not images:
        raise ValueError("the batch is empty: give at least one request")
    # The model sees RGB: the noise and the processor work on that (see noise.py).
    return [as_rgb(image) for image in images], prompts, parse_verdicts(verdicts)


def _check_noised(noised_images, images):
    from PIL import Image

    if isinstance(noised_images, Image.Image) or not isinstance(noised_images, Sequence):
        raise TypeError("noised_images must be a list with one image per request")
    if len(noised_images) != len(images):
        raise ValueError(f"got {len(noised_images)} noised images for {len(images)} requests")
    for i, (noised, image) in enumerate(zip(noised_images, images)):
        if not isinstance(noised, Image.Image):
            raise TypeError(f"noised_images[{i}] must be a PIL.Image.Image, got {type(noised).__name__}")
        if noised.size != image.size:
            raise ValueError(f"noised_images[{i}] is {noised.size} but images[{i}] is {image.size}: they must match")
    return [as_rgb(noised) for noised in noised_images]


def _sampling(do_sample, temperature, top_k, top_p) -> dict:
    # SteeringParams' checks (the command line's too), whether or not this run samples: a
    # value that would be rejected when sampling is not silently ignored on a greedy run.
    SteeringParams(temperature=temperature, top_k=top_k, top_p=top_p)
    if not do_sample:
        return dict(temperature=0.0, top_k=0, top_p=1.0)
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"do_sample=True needs a temperature > 0, got {temperature!r}")
    return dict(temperature=float(temperature), top_k=top_k, top_p=top_p)


def resolve_refusal(refusal, processor) -> RefusalVocabulary:
    """The refusal set as a :class:`RefusalVocabulary` (from the tokenizer when ``None``)."""
    if refusal is None:
        return RefusalVocabulary.from_tokenizer(processor)
    if isinstance(refusal, RefusalVocabulary):
        return refusal
    if isinstance(refusal, torch.Tensor) and refusal.dtype == torch.bool:
        refusal = refusal.nonzero().flatten()
    if isinstance(refusal, torch.Tensor):
        refusal = refusal.tolist()
    return RefusalVocabulary(refusal)


def eos_ids(eos_token_id, model, tokenizer, adapter: ModelAdapter | None = None) -> frozenset[int]:
    """The ids that end a request: ``eos_token_id`` (an int or several) exactly as given, else
    the model's generation config's (else the tokenizer's) together with the family's
    end-of-turn tokens that the tokenizer has (``adapter.end_of_turn_ids``: Qwen's
    ``<|im_end|>``, Idefics' ``<end_of_utterance>``, ...); none at all is an empty set."""
    if eos_token_id is not None:
        return _ids(eos_token_id)
    generation_config = getattr(model, "generation_config", None)
    eos_token_id = getattr(generation_config, "eos_token_id", None)
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    turn_ends = adapter.end_of_turn_ids(tokenizer) if adapter is not None else frozenset()
    return _ids(eos_token_id) | turn_ends


def _ids(eos_token_id) -> frozenset[int]:
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset([eos_token_id])
    return frozenset(int(i) for i in eos_token_id)


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS token, else 0."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0
