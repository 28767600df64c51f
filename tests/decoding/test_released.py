"""The released recipe in the batched decoder against an independent one-request, uncached
reading of the released loop (``released_reference.py``), on every family."""

from __future__ import annotations

import pytest
import torch

from safecode_kernels import ReleasedRecipe, SafeCoDeDecoder
from safecode_kernels.testing.tiny_models import BACKEND, BUILDERS, batch
from tests.decoding.released_reference import released_reference

STEER = 4
# Short answers: the reference runs a full forward per token.
CAPS = {"llava": (3, 5), "qwen": (4, 3), "instructblip": (3, 4), "idefics": (2, 5)}
RECIPE = ReleasedRecipe(length_caps=CAPS)
VERDICTS = ["unsafe", "safe", "none"]


def run(model, processor, recipe=RECIPE, verdicts=VERDICTS, prefix="shared", steer_steps=STEER, **options):
    images, prompts, _, kwargs = batch(processor, prefix)
    images, prompts = images[: len(verdicts)], prompts[: len(verdicts)]
    if "system_prompt" in kwargs:
        kwargs["system_prompt"] = kwargs["system_prompt"][: len(verdicts)]
    decoder = SafeCoDeDecoder(
        model, processor, steer_steps=steer_steps, recipe=recipe, backend=BACKEND, min_shared_prefix=1
    )
    result = decoder.generate(images, prompts, verdicts, **kwargs, **options)
    reference = released_reference(
        model,
        processor,
        images,
        prompts,
        verdicts,
        recipe=recipe,
        steer_steps=steer_steps,
        family=decoder.adapter.family,
        **kwargs,
        **options,
    )
    return result, reference


def assert_matches(result, reference):
    assert result.sequences == [r.tokens for r in reference]
    for records, ref in zip(result.steering, reference):
        phrases = [r.phrase for r in records if r.phrase is not None]
        assert phrases == ([ref.phrase] if ref.phrase else [])


@pytest.mark.parametrize("prefix", ["shared", "none"])
def test_matches_reference(tiny, prefix):
    model, processor, _ = tiny
    result, reference = run(model, processor, prefix=prefix, do_sample=False)
    assert_matches(result, reference)
    unsafe, safe, none = result.steering
    # The unsafe answer starts with the forced phrase's first ids; the safe one is suppressed.
    forced = processor.tokenizer.encode(reference[0].phrase, add_special_tokens=False)[:STEER]
    assert result.sequences[0][: len(forced)] == forced
    assert [r.action for r in unsafe] == ["forced"] * len(forced)
    assert all(r.action == "suppressed" and r.refusal_mass_after < r.refusal_mass_before for r in safe)
    assert none == []
    # Caps count the tokens after the steered prefix.
    family = SafeCoDeDecoder(model, processor).adapter.family
    assert len(result.sequences[2]) == CAPS[family][1] or result.sequences[2][-1] in (processor.tokenizer.eos_token_id,)


def test_caller_limit_and_sampled_continuation(tiny):
    """A caller's max_new_tokens counts every token; sampled steps draw from the same
    generator in the same order as the reference (one request at a time)."""
    model, processor, _ = tiny
    for verdict in ("safe", "unsafe"):
        result, reference = run(
            model,
            processor,
            verdicts=[verdict],
            max_new_tokens=7,
            do_sample=True,
            generator=torch.Generator().manual_seed(3),
        )
        # The reference draws from its own generator seeded the same way.
        images, prompts, _, kwargs = batch(processor)
        reference = released_reference(
            model,
            processor,
            images[:1],
            prompts[:1],
            [verdict],
            recipe=RECIPE,
            steer_steps=STEER,
            family=SafeCoDeDecoder(model, processor).adapter.family,
            max_new_tokens=7,
            do_sample=True,
            generator=torch.Generator().manual_seed(3),
            system_prompt=kwargs["system_prompt"][:1],
        )
        assert_matches(result, reference)
        assert len(result.sequences[0]) <= 7


def test_unsafe_with_one_step_takes_the_safe_path(tiny):
    model, processor, _ = tiny
    result, reference = run(model, processor, verdicts=["unsafe"], steer_steps=1, do_sample=False)
    assert_matches(result, reference)
    assert [r.action for r in result.steering[0]] == ["suppressed"]


def test_empty_phrase_list_boosts(tiny):
    """No phrase to force: every refusal token's probability is multiplied by 1 + lambda_boost."""
    model, processor, refusal = tiny
    recipe = ReleasedRecipe(phrases=(), length_caps=CAPS)
    decoder = SafeCoDeDecoder(model, processor, steer_steps=3, recipe=recipe, refusal=refusal, backend=BACKEND)
    images, prompts, _, kwargs = batch(processor)
    result = decoder.generate(
        images[:1],
        prompts[:1],
        ["unsafe"],
        do_sample=False,
        return_logits=True,
        system_prompt=kwargs["system_prompt"][:1],
    )
    records = result.steering[0]
    assert [r.action for r in records] == ["boosted"] * 3
    assert all(r.refusal_mass_after > r.refusal_mass_before for r in records)
    # The token is the argmax of the boosted distribution.
    assert [r.token for r in records] == result.steered_logits[0].argmax(-1).tolist()


# ----- rules that need chosen tokens: a scripted bias on the logits -------------------------
@pytest.fixture
def scripted(request):
    """A tiny model of ``request.param`` whose logits get ``table[a, b]`` added for the next
    token ``b`` after the input token ``a`` at every position. The bias depends only on each
    position's input token, so batched, cached and uncached forwards see the same logits."""
    model, processor = BUILDERS[request.param]()
    vocab = model.get_output_embeddings().weight.shape[0]
    table = torch.zeros(vocab, vocab)
    seen = {}

    def on_embed(module, args, output):
        seen["ids"] = args[0]

    def on_head(module, args, output):
        ids = seen["ids"][:, -output.shape[1] :].clamp(0, vocab - 1)
        return output + table[ids.cpu()].to(output.device, output.dtype)

    handles = [
        model.get_input_embeddings().register_forward_hook(on_embed),
        model.get_output_embeddings().register_forward_hook(on_head),
    ]
    yield model, processor, table
    for handle in handles:
        handle.remove()


def _token(processor, test, exclude=()) -> int:
    """The first vocabulary id whose decoded text passes ``test``."""
    tok = processor.tokenizer
    for i in range(len(tok)):
        if i not in exclude and test(tok.decode([i])):
            return i
    raise AssertionError("no such token in the tiny vocabulary")


def _prompt_ends(model, processor) -> list[int]:
    from safecode_kernels.decoding.requests import prepare

    images, prompts, _, kwargs = batch(processor)
    setup = prepare(model, processor, images, prompts, ["none"] * 3, steer_steps=0, **kwargs)
    return sorted({int(r.input_ids[-1]) for r in setup.requests})


def _tokens(processor):
    quote = _token(processor, lambda t: t == '"')
    capital = _token(processor, lambda t: len(t) >= 2 and t.isalpha() and t[0].isupper())
    spaced = _token(processor, lambda t: len(t) >= 3 and t[0] == " " and t[1:].isalpha() and t[1].islower())
    lower = _token(processor, lambda t: len(t) >= 2 and t.isalpha() and t.islower())
    dollar = _token(processor, lambda t: t == "$")
    bar = _token(processor, lambda t: t == "|")
    return quote, capital, spaced, lower, dollar, bar


@pytest.mark.parametrize("scripted", ["llava", "qwen2_vl"], indirect=True)
def test_quote_mark_and_early_stop(scripted):
    """A quote mark on top: the second token is taken; two words, the first capitalised:
    steering stops early."""
    model, processor, table = scripted
    quote, capital, spaced, *_ = _tokens(processor)
    for end in _prompt_ends(model, processor):
        table[end, quote], table[end, capital] = 100.0, 90.0
    table[capital, spaced] = table[spaced, capital] = 100.0
    result, reference = run(model, processor, verdicts=["safe", "safe"], do_sample=False)
    assert_matches(result, reference)
    for sequence, records, ref in zip(result.sequences, result.steering, reference):
        assert ref.early_stop and sequence[:2] == [capital, spaced] and len(records) == 2


@pytest.mark.parametrize("scripted", ["llava", "qwen2_vl"], indirect=True)
@pytest.mark.parametrize("marker", ["$", "|"])
def test_corruption_guard(scripted, marker):
    """A steered prefix holding ``$`` keeps its first token; one whose first token is ``|``
    keeps nothing. The answer goes on from the kept prefix."""
    model, processor, table = scripted
    quote, capital, spaced, lower, dollar, bar = _tokens(processor)
    # "$": lower, $, spaced, lower, ...   "|": |, spaced, lower, spaced, ...
    script = [lower, dollar, spaced, lower] if marker == "$" else [bar, spaced, lower, spaced]
    for end in _prompt_ends(model, processor):
        table[end, script[0]] = 100.0
    for a, b in zip(script, script[1:]):
        table[a, b] = 100.0
    result, reference = run(model, processor, verdicts=["safe", "unsafe", "none"], do_sample=False)
    assert_matches(result, reference)
    assert reference[0].guarded and not reference[1].guarded
    keep = 1 if marker == "$" else 0
    dropped = len(reference[0].steered) - keep
    assert result.stats["dropped_after_steering"] == {0: dropped}
    assert result.sequences[0][:keep] == reference[0].steered[:keep]
    assert [r.step for r in result.steering[0]] == list(range(keep))
    # Without the guard the steered prefix stays.
    unguarded, reference = run(
        model,
        processor,
        recipe=ReleasedRecipe(length_caps=CAPS, corruption_guard=False),
        verdicts=["safe"],
        do_sample=False,
    )
    assert_matches(unguarded, reference)
    assert unguarded.sequences[0][:STEER] == reference[0].steered


def test_a_generator_on_the_logits_device_draws_directly():
    """A generator on the logits' device type draws itself (``cuda`` without an index counts as
    any CUDA device, as ``torch.Generator("cuda")`` reports); one elsewhere seeds a generator
    on the logits' device from it, on the host."""
    import types

    from safecode_kernels.decoding.released import ReleasedSteering

    for where in ("cuda", "cuda:0"):
        steering = object.__new__(ReleasedSteering)
        generator = types.SimpleNamespace(device=torch.device(where))
        steering.setup, steering._device_generator = types.SimpleNamespace(generator=generator), None
        assert steering._generator(torch.device("cuda", 0)) is generator
    steering.setup.generator = torch.Generator().manual_seed(5)
    assert steering._generator(torch.device("cpu")) is steering.setup.generator


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_spellings_sample_alike(tiny):
    """``Generator("cuda")`` and ``Generator("cuda:0")`` with one seed give the same sampled answer."""
    import copy

    model, processor, _ = tiny
    model = copy.deepcopy(model).to("cuda")  # the fixture's model is shared
    images, prompts, _, kwargs = batch(processor)
    decoder = SafeCoDeDecoder(model, processor, steer_steps=STEER, recipe=RECIPE, backend=BACKEND)
    answers = [
        decoder.generate(
            images,
            prompts,
            VERDICTS,
            do_sample=True,
            generator=torch.Generator(where).manual_seed(1),
            **kwargs,
        ).sequences
        for where in ("cuda", "cuda:0")
    ]
    assert answers[0] == answers[1]
