"""The fused two-branch decoder against the naive oracle and the two-cache loop (docs/design.md §3)."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

from safecode_kernels.decoding import SafeCoDeDecoder, get_adapter, naive_safecode_generate, safecode_generate
from safecode_kernels.decoding import decoder as decoder_module
from safecode_kernels.decoding.noise import noised_views
from safecode_kernels.decoding.requests import build_prompt
from safecode_kernels.refusal import RefusalVocabulary
from safecode_kernels.testing.tiny_models import BACKEND, PARAMS, batch, has_text_prefix
from tests.decoding.compare import MAX_NEW, STEER, assert_same, run_all


@pytest.mark.parametrize("prefix", ["shared", "none", "mixed"])
def test_matches_naive_and_two_cache(tiny, prefix):
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor, prefix)
    fused, naive, two = run_all(model, processor, refusal, images, prompts, verdicts, **kwargs)
    assert_same(fused, naive)
    assert_same(two, naive)
    assert all(len(s) == MAX_NEW for s in fused.sequences)
    assert [len(s) for s in fused.steering] == [STEER] * 3
    assert all(len(x) == MAX_NEW for x in fused.logits)
    assert (fused.stats["prefix_columns"] > 0) == has_text_prefix(processor, prefix)


def test_the_image_matters(tiny):
    """The fixture's image changes the logits far beyond the equivalence tolerance, or the
    tests above could not tell a real row from a noised one."""
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor)
    result = naive_safecode_generate(
        model,
        processor,
        images,
        prompts,
        verdicts,
        params=PARAMS,
        steer_steps=1,
        refusal=refusal,
        backend=BACKEND,
        max_new_tokens=1,
        return_logits=True,
        **kwargs,
    )
    for real, noised in zip(result.logits, result.noised_logits):
        assert float((real[0] - noised[0]).abs().max()) > 10 * 1e-4


def test_steering_moves_refusal_mass(tiny):
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor)
    params = PARAMS.replace(scope="all")  # every refusal token gets the bias
    result = SafeCoDeDecoder(model, processor, params, steer_steps=STEER, refusal=refusal, backend=BACKEND).generate(
        images, prompts, verdicts, max_new_tokens=MAX_NEW, **kwargs
    )
    unsafe, safe, none = result.steering
    assert all(r.refusal_mass_after > r.refusal_mass_before for r in unsafe)
    assert all(r.refusal_mass_after < r.refusal_mass_before for r in safe)
    assert all(r.refusal_mass_after == pytest.approx(r.refusal_mass_before) for r in none)


def test_eos_and_verdict_limits(tiny):
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor)
    first = SafeCoDeDecoder(model, processor, PARAMS, steer_steps=STEER, refusal=refusal, backend=BACKEND).generate(
        images, prompts, verdicts, max_new_tokens=MAX_NEW, **kwargs
    )
    eos = first.sequences[1][1]  # request 1 ends at its second token (a steered step)
    kwargs.update(eos_token_id=eos, max_new_tokens_unsafe=4)
    fused, naive, two = run_all(model, processor, refusal, images, prompts, verdicts, **kwargs)
    assert_same(fused, naive)
    assert_same(two, naive)
    for request, (sequence, full) in enumerate(zip(fused.sequences, first.sequences)):
        limit = 4 if verdicts[request] == "unsafe" else MAX_NEW
        expected = full[:limit] if eos not in full[:limit] else full[: full.index(eos) + 1]
        assert sequence == expected
    assert len(fused.sequences[1]) == 2


def test_shared_prefix_is_computed_once(tiny):
    """The text before the image goes through the model once per request, on B rows, not 2B."""
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor)
    calls = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: calls.append(args[0].clone()))
    try:
        shared = SafeCoDeDecoder(
            model, processor, PARAMS, steer_steps=STEER, refusal=refusal, backend=BACKEND, min_shared_prefix=1
        )
        result = shared.generate(images, prompts, verdicts, max_new_tokens=MAX_NEW, return_logits=True, **kwargs)
        shared_calls, calls[:] = list(calls), []
        unshared = SafeCoDeDecoder(
            model, processor, PARAMS, steer_steps=STEER, refusal=refusal, backend=BACKEND, share_prefix=False
        )
        reference = unshared.generate(images, prompts, verdicts, max_new_tokens=MAX_NEW, return_logits=True, **kwargs)
        unshared_calls = list(calls)
    finally:
        hook.remove()
    prefix = result.stats["prefix_columns"]
    image_id = model.config.image_token_id
    if has_text_prefix(processor, "shared"):
        # First the prefixes: 3 rows (one per request), no image token.
        prefix_call, *shared_calls = shared_calls
        assert prefix_call.shape == (3, prefix) and not (prefix_call == image_id).any()
    else:  # the prompts start with the image: nothing to share, no prefix forward
        assert prefix == 0
    # Then the rest of the prompts on 6 rows.
    prompt_call = shared_calls[0]
    assert prompt_call.shape[0] == 6 and (prompt_call == image_id).any()
    # Steered steps on 6 rows, then 3 rows after the noised rows are dropped.
    assert [c.shape for c in shared_calls[1:]] == [(6, 1)] * (STEER - 1) + [(3, 1)] * (MAX_NEW - STEER)
    # Without sharing, the whole prompt runs on 6 rows; the answers are the same.
    assert unshared_calls[0].shape[0] == 6
    assert reference.stats["prefix_columns"] == 0
    assert_same(result, reference)
    # Every row of the prompt call starts (after its padding) at the first image token: nothing before
    # the image runs twice.
    pad = processor.tokenizer.pad_token_id
    for row in prompt_call:
        assert row[row != pad][0] == image_id


class _WatchedCache(DynamicCache):
    """Records whether the two-branch cache tensors are gone right after the noised rows are dropped."""

    freed: list[bool] = []
    batch_sizes: list[int] = []

    def batch_select_indices(self, indices):
        old = [weakref.ref(t) for layer in self.layers for t in (layer.keys, layer.values)]
        super().batch_select_indices(indices)
        _WatchedCache.freed.append(all(ref() is None for ref in old))
        _WatchedCache.batch_sizes.append(self.layers[0].keys.shape[0])


def test_noised_rows_are_freed(tiny, monkeypatch):
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor)
    monkeypatch.setattr(decoder_module, "new_cache", lambda model, capacity=None: _WatchedCache(config=model.config))
    _WatchedCache.freed, _WatchedCache.batch_sizes = [], []
    result = SafeCoDeDecoder(model, processor, PARAMS, steer_steps=STEER, refusal=refusal, backend=BACKEND).generate(
        images, prompts, verdicts, max_new_tokens=MAX_NEW, **kwargs
    )
    assert _WatchedCache.freed == [True] and _WatchedCache.batch_sizes == [3]
    assert result.stats["cache_bytes_after_drop"] * 2 == result.stats["cache_bytes_two_branch"]


def test_sampling_is_reproducible(tiny):
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor)
    kwargs.update(max_new_tokens=MAX_NEW, do_sample=True, temperature=1.5, top_p=0.95)

    def sample(seed, **extra):
        decoder = SafeCoDeDecoder(
            model, processor, PARAMS, steer_steps=STEER, refusal=refusal, seed=seed, backend=BACKEND
        )
        return decoder.generate(images, prompts, verdicts, **kwargs, **extra).sequences

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    # An explicit generator drives the sampling; the decoder's seed still draws the noised images.
    seeded = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    assert sample(1, generator=seeded()) == sample(1, generator=seeded())


def test_no_steering_is_plain_generation(tiny):
    """steer_steps=0 gives what the model's own greedy ``generate`` gives, request by request."""
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor)
    result = SafeCoDeDecoder(model, processor, steer_steps=0, refusal=refusal, backend=BACKEND).generate(
        images, prompts, verdicts, max_new_tokens=MAX_NEW, eos_token_id=[], **kwargs
    )
    assert result.steering == [[], [], []]
    assert "cache_bytes_two_branch" not in result.stats
    adapter = get_adapter(model, processor)
    for i, (image, prompt) in enumerate(zip(images, prompts)):
        text = build_prompt(adapter, processor, prompt, kwargs["system_prompt"][i])
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        # The decoders never generate image placeholders; tell generate the same.
        out = model.generate(
            **inputs,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=None,
            min_new_tokens=MAX_NEW,
            suppress_tokens=adapter.placeholder_ids,
        )
        assert out[0, inputs["input_ids"].shape[1] :].tolist() == result.sequences[i]


def test_safecode_generate_one_request(tiny):
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor)
    settings = dict(params=PARAMS, steer_steps=STEER, refusal=refusal, backend=BACKEND)
    many = SafeCoDeDecoder(model, processor, **settings).generate(
        images, prompts, verdicts, max_new_tokens=MAX_NEW, **kwargs
    )
    # Alone, request 2 would draw the seed's first noise sample: give it the batch's view.
    view = noised_views(images, 0.1, 0)[2]
    one = safecode_generate(
        model,
        processor,
        images[2],
        prompts[2],
        verdicts[2],
        max_new_tokens=MAX_NEW,
        noised_image=view,
        system_prompt=kwargs["system_prompt"][2],
        **settings,
    )
    assert one.sequences == [many.sequences[2]]
    assert one.texts == [many.texts[2]]


def test_noised_images_are_used(tiny):
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor)
    decoder = SafeCoDeDecoder(model, processor, PARAMS, steer_steps=STEER, refusal=refusal, backend=BACKEND)
    same = decoder.generate(
        images, prompts, verdicts, max_new_tokens=2, noised_images=images, return_logits=True, **kwargs
    )
    for real, noised in zip(same.logits, same.noised_logits):
        torch.testing.assert_close(real[:2], noised, atol=1e-5, rtol=0)


def test_default_refusal_vocabulary(tiny):
    model, processor, _ = tiny
    if not hasattr(RefusalVocabulary, "from_tokenizer"):
        pytest.skip("RefusalVocabulary.from_tokenizer is not there yet")
    images, prompts, verdicts, kwargs = batch(processor)
    result = SafeCoDeDecoder(model, processor, steer_steps=2, backend=BACKEND).generate(
        images, prompts, verdicts, max_new_tokens=3, **kwargs
    )
    assert [len(s) for s in result.sequences] == [3, 3, 3]


def test_auto_backend(tiny):
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor)
    settings = dict(params=PARAMS, steer_steps=STEER, refusal=refusal)
    auto = SafeCoDeDecoder(model, processor, **settings).generate(
        images, prompts, verdicts, max_new_tokens=MAX_NEW, **kwargs
    )
    ref = SafeCoDeDecoder(model, processor, **settings, backend="torch").generate(
        images, prompts, verdicts, max_new_tokens=MAX_NEW, **kwargs
    )
    assert auto.sequences == ref.sequences


@pytest.mark.parametrize("steer_steps,max_new", [(3, 1), (5, 3), (0, 3)])
def test_short_answers(tiny, steer_steps, max_new):
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor, "mixed")
    settings = dict(params=PARAMS, steer_steps=steer_steps, refusal=refusal, backend=BACKEND)
    fused = SafeCoDeDecoder(model, processor, **settings).generate(
        images, prompts, verdicts, max_new_tokens=max_new, return_logits=True, **kwargs
    )
    naive = naive_safecode_generate(
        model, processor, images, prompts, verdicts, max_new_tokens=max_new, return_logits=True, **settings, **kwargs
    )
    assert_same(fused, naive)
    assert [len(s) for s in fused.sequences] == [max_new] * 3
    assert [len(s) for s in fused.steering] == [min(steer_steps, max_new)] * 3


class PoisonRow:
    """A forward hook on the LM head that writes ``value`` into one row of its ``call``-th
    output (call 0 is the prefill, call n the n-th decoding step)."""

    def __init__(self, call: int, row: int, value: float):
        self.call, self.row, self.value, self.calls = call, row, value, 0

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls - 1 == self.call:
            output = output.clone()
            output[self.row, -1, 7] = self.value
        return output


@pytest.mark.parametrize(
    "step, row, value, branch",
    [(1, 3, float("nan"), "noised image"), (0, 2, float("inf"), "real image"), (4, 1, float("nan"), "real image")],
    ids=["steered-noised-nan", "steered-real-inf", "plain-nan"],
)
def test_a_request_with_bad_logits_ends_alone(tiny, step, row, value, branch):
    """Logits that turn NaN or +inf in one request's row end that request alone, with an error
    naming the step and the branch; the others finish with the tokens they have without it.
    Request 1 owns rows 2 (real) and 3 (noised) while steering (steps 0 and 1), row 1 afterwards."""
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor)
    decoder = SafeCoDeDecoder(
        model, processor, PARAMS, steer_steps=2, refusal=refusal, backend=BACKEND, prefill_chunk_tokens=0
    )
    settings = dict(max_new_tokens=6, eos_token_id=[], **kwargs)
    clean = decoder.generate(images, prompts, verdicts, **settings)
    handle = model.get_output_embeddings().register_forward_hook(PoisonRow(step, row, value))
    try:
        result = decoder.generate(images, prompts, verdicts, **settings)
    finally:
        handle.remove()
    assert result.errors[0] is None and result.errors[2] is None
    assert f"step {step}: the {branch} branch's next-token logits hold NaN or +inf" in result.errors[1]
    assert clean.errors == [None] * 3
    assert result.sequences[0] == clean.sequences[0] and result.sequences[2] == clean.sequences[2]
    assert result.sequences[1] == clean.sequences[1][:step]
    assert result.texts[0] == clean.texts[0]


def test_the_step_op_still_raises_for_direct_callers():
    from safecode_kernels import StepError, safecode_step

    real = torch.zeros(2, 8)
    real[1, 3] = float("nan")
    with pytest.raises(StepError, match="logits_real row 1 contains NaN"):
        safecode_step(real, torch.zeros(2, 8), ["safe", "safe"], RefusalVocabulary([1]), PARAMS, backend=BACKEND)


# A host read of a value shows as exactly one of these: ``_local_scalar_dense`` normally,
# ``is_nonzero`` / ``item`` under inference mode (which skips their decomposition).
_READ_OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default)


class _HostReads(TorchDispatchMode):
    """Counts the host reads of a tensor's value: ``bool(t)``, ``int(t)``, ``t.item()`` (as
    dispatched ops) and ``t.tolist()`` (which does not dispatch on the CPU: counted by a
    wrapper), the decoder's own ``_read_step`` included."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        real_tolist = torch.Tensor.tolist

        def tolist(tensor):
            self.count += 1
            return real_tolist(tensor)

        monkeypatch.setattr(torch.Tensor, "tolist", tolist)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READ_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("recipe", ["paper", "released"])
@pytest.mark.parametrize(
    "poison", [None, (2, 1, float("nan")), (0, 3, float("inf"))], ids=["clean", "bad-plain", "bad-steered"]
)
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_one_host_read_per_step(tiny, monkeypatch, poison, sampled, recipe):
    """Every step's choice (steered, forced and plain, in both recipes) reads the device once:
    the tokens, the step op's status words, the refusal masses, the rows holding NaN or +inf
    and what the released recipe's rules need (phrase rankings, the two best tokens) in one
    copy; a step with a bad row reads once more (its step runs again without it). Sampled
    steps also draw each seed from the run's generator, a CPU one (a read of host memory),
    and nothing else is read."""
    from safecode_kernels import ReleasedRecipe
    from safecode_kernels.ops import step_inputs

    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor)
    reads, seeds, counts = [], [], []
    real_read, real_choose, real_seed = decoder_module._read_step, decoder_module._Run.choose, step_inputs.seed_from
    monkeypatch.setattr(decoder_module, "_read_step", lambda values: reads.append(1) or real_read(values))
    monkeypatch.setattr(step_inputs, "seed_from", lambda generator: seeds.append(1) or real_seed(generator))

    def choose(run, logits):
        reads.clear(), seeds.clear()
        with _HostReads(monkeypatch) as counter:
            tokens = real_choose(run, logits)
        monkeypatch.setattr(torch.Tensor, "tolist", real_tolist)
        counts.append((len(reads), counter.count - len(seeds) - len(reads)))
        return tokens

    params = PARAMS.replace(temperature=0.8, top_p=0.9) if sampled else PARAMS
    if recipe == "released":  # no corruption guard: a cut prefix takes one more read, once (tested apart)
        options = dict(recipe=ReleasedRecipe(corruption_guard=False))
        verdicts = ["unsafe", "safe", "none"]
    else:
        options = dict(refusal=refusal)
    decoder = SafeCoDeDecoder(model, processor, params, steer_steps=2, backend=BACKEND, **options)
    settings = dict(do_sample=True, temperature=0.8, top_p=0.9) if sampled else dict(do_sample=False)
    settings.update(max_new_tokens=5, eos_token_id=[], **kwargs)
    # A first run builds what is built once (the refusal mask, the per-temperature decision).
    decoder.generate(images, prompts, verdicts, **settings)
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(decoder_module._Run, "choose", choose)
    handle = model.get_output_embeddings().register_forward_hook(PoisonRow(*poison)) if poison else None
    try:
        result = decoder.generate(images, prompts, verdicts, **settings)
    finally:
        if handle is not None:
            handle.remove()
    expected = [(1, 0)] * 5
    if poison:
        expected[poison[0]] = (2, 0)
        assert result.errors[1] is not None
    assert counts == expected
