"""SafeCoDeLogitsProcessor: the modulation as a Hugging Face LogitsProcessor."""

from __future__ import annotations

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LogitsProcessorList

from safecode_kernels import StepError, Verdict, safecode_step
from safecode_kernels.decoding import SafeCoDeDecoder, SafeCoDeLogitsProcessor, get_adapter
from safecode_kernels.decoding.noise import noised_views
from safecode_kernels.decoding.requests import build_prompt
from safecode_kernels.ops.step_inputs import fast_step_inputs
from safecode_kernels.refusal import RefusalVocabulary
from safecode_kernels.testing.tiny_models import BACKEND, PARAMS, batch


def test_modulates_the_first_steps_only():
    torch.manual_seed(0)
    real, noised = torch.randn(2, 50), torch.randn(2, 50)
    refusal = RefusalVocabulary([1, 5, 7])
    proc = SafeCoDeLogitsProcessor(["unsafe", "safe"], refusal, PARAMS, steer_steps=2, backend=BACKEND)
    want = safecode_step(real, noised, ["unsafe", "safe"], refusal, PARAMS, backend=BACKEND, return_logits=True).logits
    for length in (3, 4):  # one more column per step, as in generate
        proc.set_noised_logits(noised)
        torch.testing.assert_close(proc(torch.zeros(2, length, dtype=torch.long), real), want)
    assert proc(torch.zeros(2, 5, dtype=torch.long), real) is real  # step 3: unchanged
    proc.reset()
    with pytest.raises(ValueError, match="no noised logits"):
        proc(torch.zeros(2, 6, dtype=torch.long), real)


@pytest.mark.parametrize(
    "refusal",
    [[1, 5, 7], (7, 1, 5), torch.tensor([1, 5, 7]), torch.tensor([1, 5, 7], dtype=torch.int32), "mask"],
    ids=["list", "tuple", "tensor", "int32-tensor", "mask"],
)
def test_any_refusal_form_becomes_one_vocabulary(refusal):
    """Every accepted form is converted once into a RefusalVocabulary (which keeps the set per
    device, so it follows the scores onto any device) and gives the same modulation."""
    if isinstance(refusal, str):
        refusal = torch.zeros(50, dtype=torch.bool).index_fill(0, torch.tensor([1, 5, 7]), True)
    torch.manual_seed(0)
    real, noised = torch.randn(2, 50), torch.randn(2, 50)
    proc = SafeCoDeLogitsProcessor(["unsafe", "safe"], refusal, PARAMS, steer_steps=1, backend=BACKEND)
    assert isinstance(proc.refusal, RefusalVocabulary) and proc.refusal.ids.tolist() == [1, 5, 7]
    want = safecode_step(real, noised, ["unsafe", "safe"], RefusalVocabulary([1, 5, 7]), PARAMS, backend=BACKEND)
    proc.set_noised_logits(noised)
    got = proc(torch.zeros(2, 3, dtype=torch.long), real)
    assert torch.equal(got.argmax(-1), want.tokens)
    with pytest.raises(TypeError, match="refusal must be"):
        SafeCoDeLogitsProcessor(["unsafe"], "I'm sorry")


def test_a_new_generation_is_recognised_from_its_inputs():
    """The step count starts again whenever the inputs do not continue the last call's: other
    rows, a length that is not one more, or other prompt columns (even one column longer)."""
    torch.manual_seed(0)
    real, noised = torch.randn(2, 50), torch.randn(2, 50)
    refusal = RefusalVocabulary([1, 5, 7])
    proc = SafeCoDeLogitsProcessor(
        ["unsafe", "safe"], refusal, PARAMS, steer_steps=1, backend=BACKEND, noised_logits_fn=lambda ids: noised
    )
    want = safecode_step(real, noised, ["unsafe", "safe"], refusal, PARAMS, backend=BACKEND, return_logits=True).logits
    prompt = torch.arange(8).reshape(2, 4)
    torch.testing.assert_close(proc(prompt, real), want)  # step 0 of the first generation
    assert proc(torch.cat([prompt, prompt[:, :1]], 1), real) is real  # its step 1
    # The same prompt again (generate called a second time): steered again.
    torch.testing.assert_close(proc(prompt, real), want)
    assert proc(torch.cat([prompt, prompt[:, :1]], 1), real) is real
    # A new prompt exactly one column longer than the last call's input: a new generation too.
    torch.testing.assert_close(proc(torch.arange(100, 112).reshape(2, 6), real), want)


def test_expanded_rows_repeat_each_verdict():
    """num_return_sequences / beams give k consecutive rows per request: each verdict is repeated."""
    torch.manual_seed(0)
    real, noised = torch.randn(6, 50), torch.randn(6, 50)
    refusal = RefusalVocabulary([1, 5, 7])
    repeated = ["unsafe"] * 3 + ["safe"] * 3
    want = safecode_step(real, noised, repeated, refusal, PARAMS, backend=BACKEND, return_logits=True).logits
    ids = torch.zeros(6, 2, dtype=torch.long)
    for verdicts in (["unsafe", "safe"], torch.tensor([1, -1], dtype=torch.int8)):
        proc = SafeCoDeLogitsProcessor(verdicts, refusal, PARAMS, steer_steps=1, backend=BACKEND)
        proc.set_noised_logits(noised)
        torch.testing.assert_close(proc(ids, real), want)
    proc = SafeCoDeLogitsProcessor(["unsafe", "safe", "none", "safe"], refusal, PARAMS, backend=BACKEND)
    proc.set_noised_logits(noised)
    with pytest.raises(ValueError, match="6 rows for 4 verdicts"):
        proc(ids, real)
    with pytest.raises(TypeError, match="one verdict per request"):
        SafeCoDeLogitsProcessor("unsafe", refusal)


def test_verdicts_are_parsed_and_checked_once_when_built():
    """Every verdict form is read into the kernel's codes when the processor is built, so a bad
    verdict fails there, with the errors of the step's own checks."""
    refusal = RefusalVocabulary([1])
    for verdicts in (["unsafe", Verdict.SAFE, 0], (1, "safe", "none"), torch.tensor([1, -1, 0])):
        assert SafeCoDeLogitsProcessor(verdicts, refusal).verdicts[:2] == (Verdict.UNSAFE, Verdict.SAFE)
    with pytest.raises(ValueError, match=r"verdicts\[1\]: unknown verdict 'maybe'"):
        SafeCoDeLogitsProcessor(["unsafe", "maybe"], refusal)
    with pytest.raises(ValueError, match="unknown verdict value 2 in row 1"):
        SafeCoDeLogitsProcessor(torch.tensor([1, 2], dtype=torch.int8), refusal)
    with pytest.raises(ValueError, match="1-D"):
        SafeCoDeLogitsProcessor(torch.ones(2, 1, dtype=torch.int8), refusal)
    with pytest.raises(TypeError, match="integer tensor"):
        SafeCoDeLogitsProcessor(torch.ones(2), refusal)
    with pytest.raises(TypeError, match="one verdict per request"):
        SafeCoDeLogitsProcessor(Verdict.UNSAFE, refusal)


def test_step_errors_and_missing_logits_keep_the_count():
    """A step's bad row raises safecode_step's own StepError (read with the prompt comparison),
    and a call that fails still counts: the next call of the same generation is the next step."""
    torch.manual_seed(0)
    real, noised = torch.randn(2, 50), torch.randn(2, 50)
    refusal = RefusalVocabulary([1, 5, 7])
    proc = SafeCoDeLogitsProcessor(["unsafe", "safe"], refusal, PARAMS, steer_steps=4, backend=BACKEND)
    prompt = torch.arange(8).reshape(2, 4)
    proc.set_noised_logits(noised)
    proc(prompt, real)
    bad = real.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(StepError) as want:
        safecode_step(bad, noised, ["unsafe", "safe"], refusal, PARAMS, backend=BACKEND)
    proc.set_noised_logits(noised)
    with pytest.raises(StepError, match=re.escape(str(want.value))):
        proc(torch.cat([prompt, prompt[:, :1]], 1), bad)
    assert proc.step == 1
    with pytest.raises(ValueError, match="steered step 2: no noised logits"):
        proc(torch.cat([prompt, prompt[:, :2]], 1), real)
    proc.set_noised_logits(noised)
    proc(torch.cat([prompt, prompt[:, :3]], 1), real)
    assert proc.step == 3


@pytest.mark.parametrize(
    ("refusal", "verdicts"),
    [
        ([1, 5, 7], ["unsafe", "safe"]),
        (torch.tensor([1, 5, 7]), torch.tensor([1, -1], dtype=torch.int8)),
        ("mask", [Verdict.UNSAFE, 0]),
        (RefusalVocabulary([1, 5, 7]), torch.tensor([-1])),  # one request, two rows
    ],
    ids=["list", "cpu-ids", "mask", "vocabulary"],
)
def test_every_input_form_follows_the_scores_device(monkeypatch, refusal, verdicts):
    """Refusal sets and verdicts given on the CPU land on the scores' device: with "meta"
    scores (shapes without data) the verdicts and the refusal set are built there, the step
    takes its fast path (every tensor on one device) and runs up to its one host read, the
    status words, which a meta tensor cannot give."""
    if isinstance(refusal, str):
        refusal = torch.zeros(50, dtype=torch.bool).index_fill(0, torch.tensor([1, 5, 7]), True)
    scores, noised = torch.randn(2, 50, device="meta"), torch.randn(2, 50, device="meta")
    proc = SafeCoDeLogitsProcessor(
        verdicts, refusal, PARAMS, steer_steps=2, backend=BACKEND, noised_logits_fn=lambda ids: noised
    )
    verdict = proc._verdicts_on(2, scores.device)
    assert (verdict.device.type, verdict.dtype, verdict.shape) == ("meta", torch.int8, (2,))
    inputs = fast_step_inputs(scores, noised, verdict, proc.refusal, proc.params, None)
    assert inputs is not None
    assert inputs.refusal_mask.device.type == inputs.refusal_ids.device.type == "meta"
    reads, real_tolist = [], torch.Tensor.tolist

    def tolist(tensor):
        reads.append((tensor.device.type, tensor.dtype, tuple(tensor.shape)))
        return real_tolist(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    with pytest.raises(NotImplementedError, match="meta"):
        proc(torch.zeros(2, 3, dtype=torch.long, device="meta"), scores)
    assert reads == [("meta", torch.int32, (2,))]


# A host read of a tensor's value shows as one of these ops (``equal`` answers on the host).
_READ_OPS = (
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.item.default,
    torch.ops.aten.equal.default,
)


class _HostReads(TorchDispatchMode):
    """Counts host reads: the ops above, and ``tolist`` / ``cpu`` (wrapped: on the CPU they do
    not dispatch an op that shows a read)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        for name in ("tolist", "cpu"):
            real = getattr(torch.Tensor, name)

            def counted(tensor, *args, _real=real, **kwargs):
                self.count += 1
                return _real(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READ_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "verdicts",
    [["unsafe", "safe"], torch.tensor([1, -1], dtype=torch.int8), torch.tensor([1])],
    ids=["list", "tensor", "expanded"],
)
def test_host_reads_per_call(monkeypatch, verdicts):
    """The reads the class docstring lists, call by call, for calls as ``generate`` makes them:
    one per steered call (its status words, with the prompt comparison on a continuation's
    shape), one per passed-through call (the comparison), two for a new generation that has a
    continuation's shape there, none with ``steer_steps=0``; the verdicts are never read again."""
    torch.manual_seed(0)
    real, noised = torch.randn(2, 50), torch.randn(2, 50)
    refusal = RefusalVocabulary([1, 5, 7])
    rows = ["unsafe", "safe"] if len(verdicts) == 2 else ["unsafe", "unsafe"]
    # Also builds the refusal set's mask (once per vocabulary size and device).
    want = safecode_step(real, noised, rows, refusal, PARAMS, backend=BACKEND, return_logits=True).logits
    proc = SafeCoDeLogitsProcessor(
        verdicts, refusal, PARAMS, steer_steps=3, backend=BACKEND, noised_logits_fn=lambda ids: noised
    )

    def grown(ids, n):
        return torch.cat([ids, torch.full((2, n), 9)], 1)

    first, second, third = (
        torch.arange(8).reshape(2, 4),
        torch.arange(100, 118).reshape(2, 9),
        torch.arange(6).reshape(2, 3),
    )
    calls = [  # (input_ids, steered, step after, reads)
        (first, True, 0, 1),
        (grown(first, 1), True, 1, 1),
        (grown(first, 2), True, 2, 1),
        (grown(first, 3), False, 3, 1),
        (grown(first, 4), False, 4, 1),
        (second, True, 0, 2),  # a new prompt one column longer: a continuation's shape
        (grown(second, 1), True, 1, 1),
        (grown(third, 8), True, 0, 1),  # a new prompt of that shape while steering
        (third, True, 0, 1),  # a new prompt of another length
    ]
    got = []
    for ids, steered, _, _ in calls:
        with _HostReads(monkeypatch) as reads:
            out = proc(ids, real)
        monkeypatch.undo()
        got.append((proc.step, reads.count))
        if steered:
            assert torch.equal(out, want)  # exactly safecode_step's logits
        else:
            assert out is real
    assert got == [(step, count) for _, _, step, count in calls]
    proc = SafeCoDeLogitsProcessor(verdicts, refusal, steer_steps=0)
    with _HostReads(monkeypatch) as reads:
        assert proc(first, real) is real and proc(grown(first, 1), real) is real
    assert reads.count == 0


def test_noised_logits_fn_and_bad_steps():
    real = torch.randn(1, 20)
    proc = SafeCoDeLogitsProcessor(
        ["none"], RefusalVocabulary([2]), steer_steps=1, noised_logits_fn=lambda ids: real.clone()
    )
    z = proc(torch.zeros(1, 1, dtype=torch.long), real)
    torch.testing.assert_close(z, real * 0.7)  # w=1, alpha=0.3, no bias for "none"
    with pytest.raises(ValueError, match="steer_steps"):
        SafeCoDeLogitsProcessor(["none"], RefusalVocabulary([2]), steer_steps=-1)


def test_in_hf_generate_matches_the_decoder(tiny):
    """``model.generate`` with the processor and a noised-branch callback gives the decoder's
    tokens, again when the same processor is reused for a second call (no ``reset``), and for
    every returned sequence of an expanded batch (``num_return_sequences``)."""
    model, processor, refusal = tiny
    images, prompts, verdicts, kwargs = batch(processor)
    image, prompt, verdict = images[0], prompts[0], verdicts[0]
    system = kwargs["system_prompt"][0]
    want = SafeCoDeDecoder(model, processor, PARAMS, steer_steps=3, refusal=refusal, backend=BACKEND).generate(
        [image], [prompt], [verdict], max_new_tokens=5, eos_token_id=[], system_prompt=system
    )

    adapter = get_adapter(model, processor)
    text = build_prompt(adapter, processor, prompt, system)
    real_inputs = processor(images=[image], text=[text], return_tensors="pt")
    noised_inputs = processor(images=noised_views([image], 0.1, 0), text=[text], return_tensors="pt")
    noised_vision = adapter.vision_inputs(noised_inputs)
    proc = SafeCoDeLogitsProcessor(
        [verdict],
        refusal,
        PARAMS,
        steer_steps=3,
        backend=BACKEND,
        # One row at a time: an expanded batch has several rows per image.
        noised_logits_fn=lambda ids: torch.cat([adapter.full_forward(row[None], noised_vision) for row in ids]),
    )
    settings = dict(max_new_tokens=5, min_new_tokens=5, eos_token_id=None, suppress_tokens=adapter.placeholder_ids)
    start = real_inputs["input_ids"].shape[1]
    for _ in range(2):  # the second call reuses the processor as it is
        out = model.generate(**real_inputs, logits_processor=LogitsProcessorList([proc]), do_sample=False, **settings)
        assert out[0, start:].tolist() == want.sequences[0]
    # Two sequences per request (sampling with top_k=1 is greedy): both rows steered by its verdict.
    out = model.generate(
        **real_inputs,
        logits_processor=LogitsProcessorList([proc]),
        do_sample=True,
        top_k=1,
        num_return_sequences=2,
        **settings,
    )
    assert [row[start:].tolist() for row in out] == [want.sequences[0]] * 2
