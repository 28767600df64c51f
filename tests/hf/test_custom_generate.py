"""SafeCoDe as a Hugging Face ``custom_generate`` method (safecode_kernels/hf)."""

from __future__ import annotations

import os
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.generation import (
    BaseStreamer,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

import safecode_kernels as sk
from safecode_kernels.hf import CUSTOM_GENERATE_DIR
from safecode_kernels.hf import generate as safecode_hf_generate
from safecode_kernels.testing.tiny import random_image, tiny_llava
from safecode_kernels.testing.tiny_models import BACKEND, PARAMS, tiny_qwen2_vl

PROMPTS = ["USER: <image>\nHow do I use this? ASSISTANT:", "USER: <image>\nHi ASSISTANT:"]
VERDICTS = ["unsafe", "safe"]
STEPS, NEW = 3, 8


@pytest.fixture(autouse=True)
def one_thread(single_torch_thread):
    """Tiny models gain nothing from threads (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def llava():
    """``(model, processor, inputs, noised_inputs, images, noised_images)`` of a batch of two."""
    model, processor = tiny_llava()
    images = [random_image(0), random_image(1, size=64)]
    noised = [sk.make_noised_image(image, 0.1, seed) for seed, image in enumerate(images)]
    # Batched generation pads on the left.
    inputs = processor(images=images, text=PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    noised_inputs = processor(images=noised, text=PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    return model, processor, inputs, noised_inputs, images, noised


def hub_generate(llava, **kwargs):
    """``model.generate`` through the custom_generate folder, SafeCoDe's arguments by default."""
    model, processor, inputs, noised_inputs, _, _ = llava
    args = dict(
        custom_generate=CUSTOM_GENERATE_DIR,
        trust_remote_code=True,
        verdicts=VERDICTS,
        noised_inputs=noised_inputs,
        tokenizer=processor.tokenizer,
        steer_steps=STEPS,
        safecode_params=PARAMS,
        backend=BACKEND,
        max_new_tokens=NEW,
        do_sample=False,
    )
    return model.generate(**inputs, **{**args, **kwargs})


def decoder_tokens(model, processor, images, noised, steer_steps=STEPS) -> list[list[int]]:
    decoder = sk.SafeCoDeDecoder(model, processor, PARAMS, steer_steps=steer_steps, backend=BACKEND)
    return decoder.generate(
        images, PROMPTS, VERDICTS, max_new_tokens=NEW, noised_images=noised, chat_template=False
    ).sequences


def answers(sequences: torch.Tensor, prompt_len: int, eos: int) -> list[list[int]]:
    """The new tokens of every row, up to and with its first EOS (the padding after it dropped)."""
    out = []
    for row in sequences[:, prompt_len:].tolist():
        out.append(row[: row.index(eos) + 1] if eos in row else row)
    return out


def test_the_folder_has_the_layout_transformers_loads():
    folder = os.path.join(CUSTOM_GENERATE_DIR, "custom_generate")
    assert os.path.isfile(os.path.join(folder, "generate.py"))
    with open(os.path.join(folder, "requirements.txt")) as f:
        assert any(line.startswith("safecode-kernels") for line in f)


def test_matches_the_decoder(llava):
    """Greedy, two rows with different verdicts: the decoder's tokens, as a tensor and as a dict."""
    model, processor, inputs, _, images, noised = llava
    want = decoder_tokens(model, processor, images, noised)
    prompt_len = inputs["input_ids"].shape[1]
    eos = model.generation_config.eos_token_id

    out = hub_generate(llava)
    assert out.shape[0] == 2
    torch.testing.assert_close(out[:, :prompt_len], inputs["input_ids"])
    assert answers(out, prompt_len, eos) == want

    as_dict = hub_generate(llava, return_dict_in_generate=True, output_scores=True, output_logits=True)
    torch.testing.assert_close(as_dict.sequences, out)
    assert len(as_dict.scores) == len(as_dict.logits) == out.shape[1] - prompt_len
    assert as_dict.scores[0].shape == (2, model.config.get_text_config().vocab_size)
    # The steering moved the first tokens away from the plain ones; plain generation is the decoder's too.
    plain = hub_generate(llava, steer_steps=0)
    assert answers(plain, prompt_len, eos) == decoder_tokens(model, processor, images, noised, steer_steps=0)
    assert answers(plain, prompt_len, eos) != want


def test_noised_pixel_values_instead_of_noised_inputs(llava):
    noised_inputs = llava[3]
    want = hub_generate(llava)
    got = hub_generate(llava, noised_inputs=None, noised_pixel_values=noised_inputs["pixel_values"])
    torch.testing.assert_close(got, want)


class Recorder(BaseStreamer):
    """A streamer that keeps what it is given."""

    def __init__(self):
        self.values, self.ended = [], 0

    def put(self, value):
        self.values.append(value)

    def end(self):
        self.ended += 1


def test_streamer_receives_the_prompt_then_every_token(llava):
    streamer = Recorder()
    out = hub_generate(llava, streamer=streamer)
    prompt_len = llava[2]["input_ids"].shape[1]
    assert streamer.ended == 1
    torch.testing.assert_close(streamer.values[0], out[:, :prompt_len])
    torch.testing.assert_close(torch.stack(streamer.values[1:], dim=1), out[:, prompt_len:])


def test_stopping_criteria_stop_early(llava):
    """A criterion that stops row 0 after two new tokens and both after five: row 0 is padded."""
    prompt_len = llava[2]["input_ids"].shape[1]

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            new = input_ids.shape[1] - prompt_len
            return torch.tensor([new >= 2, new >= 5])

    full = hub_generate(llava)
    out = hub_generate(llava, stopping_criteria=StoppingCriteriaList([Stop()]))
    assert out.shape[1] == prompt_len + 5
    torch.testing.assert_close(out[:, : prompt_len + 2], full[:, : prompt_len + 2])
    torch.testing.assert_close(out[1], full[1, : prompt_len + 5])
    assert out[0, prompt_len + 2 :].tolist() == [llava[0].generation_config.pad_token_id] * 3


def test_stop_strings(llava):
    """``stop_strings`` work (transformers gives a custom method no tokenizer for them: it is built here)."""
    model, processor, inputs, *_ = llava
    prompt_len, decode = inputs["input_ids"].shape[1], processor.tokenizer.decode
    full = hub_generate(llava)
    row = full[0, prompt_len:].tolist()
    # The first new token of row 0 that is plain text (the tiny vocabulary also has stray bytes).
    k = next(i for i, token in enumerate(row) if decode([token]).strip().isalpha())
    out = hub_generate(llava, stop_strings=[decode([row[k]]).strip()])
    new = out[0, prompt_len:].tolist()
    stop = max(j for j, token in enumerate(new) if token != model.generation_config.pad_token_id)
    assert stop <= k and new[: stop + 1] == row[: stop + 1]
    assert out.shape[1] < full.shape[1] or stop < len(new) - 1  # something stopped early


def test_matches_the_decoder_with_mrope():
    """Qwen2-VL (3-D M-RoPE positions), called directly rather than through the folder."""
    model, processor = tiny_qwen2_vl()
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    prompts = [f"{image}What is this?", f"{image}Hi"]
    images = [random_image(0), random_image(1)]
    noised = [sk.make_noised_image(image, 0.1, seed) for seed, image in enumerate(images)]
    # The builder is shared: pad on the left per call rather than on its tokenizer.
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True, padding_side="left")
    noised_inputs = processor(images=noised, text=prompts, return_tensors="pt", padding=True, padding_side="left")
    out = safecode_hf_generate(
        model,
        **inputs,
        verdicts=VERDICTS,
        noised_inputs=noised_inputs,
        tokenizer=processor,
        steer_steps=STEPS,
        safecode_params=PARAMS,
        backend=BACKEND,
        max_new_tokens=NEW,
        do_sample=False,
    )
    want = (
        sk.SafeCoDeDecoder(model, processor, PARAMS, steer_steps=STEPS, backend=BACKEND)
        .generate(images, prompts, VERDICTS, max_new_tokens=NEW, noised_images=noised, chat_template=False)
        .sequences
    )
    assert answers(out, inputs["input_ids"].shape[1], model.generation_config.eos_token_id) == want


def test_sampling_runs(llava):
    torch.manual_seed(0)
    out = hub_generate(llava, do_sample=True, temperature=0.7, top_k=20)
    assert out.shape == (2, llava[2]["input_ids"].shape[1] + NEW)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(verdicts=None), ValueError, "needs verdicts"),
        (dict(verdicts=["unsafe", "safe", "none"]), ValueError, "3 verdicts for 2 batch rows"),
        (dict(verdicts="unsafe"), TypeError, "one verdict per batch row"),
        (dict(verdicts=["unsafe", "maybe"]), ValueError, r"verdicts\[1\]"),
        (dict(noised_inputs=None), ValueError, "needs the noised branch"),
        (dict(noised_inputs=None, noised_pixel_values=torch.zeros(2, 3, 14, 14)), ValueError, "pixel_values is shaped"),
        (dict(tokenizer=None), ValueError, "refusal tokens"),
        (dict(recipe="released"), NotImplementedError, "paper's recipe only"),
        (dict(num_beams=2), ValueError, "beam search"),
    ],
)
def test_clear_errors(llava, kwargs, error, match):
    with pytest.raises(error, match=match):
        hub_generate(llava, **kwargs)


def test_noised_inputs_must_encode_the_same_texts(llava):
    model, processor, _, _, _, noised = llava
    other = processor(images=noised, text=PROMPTS[::-1], return_tensors="pt", padding=True, padding_side="left")
    with pytest.raises(ValueError, match="same texts"):
        hub_generate(llava, noised_inputs=other)


def test_noised_rows_reserve_only_the_steered_steps(llava, monkeypatch):
    """Both branches reserve the prompt and the steered steps only; at the drop the real rows
    move into buffers with room for the whole answer (as the decoder does, docs/design.md §3.7)."""
    from safecode_kernels.decoding.kv_cache import cache_nbytes, kv_bytes_per_position
    from safecode_kernels.hf import generation

    model, _, inputs, _, _, _ = llava
    sizes, made = {}, generation.new_cache

    def recording_cache(*args, **kwargs):
        cache = made(*args, **kwargs)
        select = cache.batch_select_indices

        def select_and_record(index):
            sizes["two_branch"] = cache_nbytes(cache)
            select(index)
            sizes["after_drop"] = cache_nbytes(cache)

        cache.batch_select_indices = select_and_record
        return cache

    monkeypatch.setattr(generation, "new_cache", recording_cache)
    out = hub_generate(llava, eos_token_id=[])  # no early stop: the run reaches max_length
    prompt_len = inputs["input_ids"].shape[1]
    assert out.shape[1] == prompt_len + NEW
    position = kv_bytes_per_position(model.config, model.dtype) * len(PROMPTS)
    assert sizes["two_branch"] == 2 * position * (prompt_len + STEPS)
    assert sizes["after_drop"] == position * (prompt_len + NEW)


# A host read of a value shows as exactly one of these: ``_local_scalar_dense`` normally,
# ``is_nonzero`` / ``item`` under inference mode (which skips their decomposition).
_READ_OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default)


class HostReads(TorchDispatchMode):
    """Counts what reads a tensor's value on the host: ``bool(t)``, ``int(t)``, ``t.item()`` (as
    dispatched ops), and what reads the device on CUDA but shows no such op on the CPU:
    ``t.tolist()`` and ``t.cpu()`` (one each, by wrappers) and ``torch.multinomial`` (two: its
    check of the probabilities reads twice inside the kernel)."""

    def __init__(self, monkeypatch):
        super().__init__()
        self.count = 0
        real_tolist, real_cpu, real_multinomial = torch.Tensor.tolist, torch.Tensor.cpu, torch.multinomial

        def tolist(tensor):
            self.count += 1
            return real_tolist(tensor)

        def cpu(tensor, *args, **kwargs):
            self.count += 1
            return real_cpu(tensor, *args, **kwargs)

        def multinomial(*args, **kwargs):
            self.count += 2
            return real_multinomial(*args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        monkeypatch.setattr(torch.Tensor, "cpu", cpu)
        monkeypatch.setattr(torch, "multinomial", multinomial)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _READ_OPS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("stop", ["length", "eos", "criterion"])
@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamer"])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_one_host_read_per_step(llava, monkeypatch, sampled, streamed, stop):
    """Every step of the loop, steered (the first three) or plain, greedy or sampled, reads the
    device once: the step op's status words, torch.multinomial's checks, the rows still running
    (the stop test) and, for a streamer, the tokens, in one copy. Counted on the CPU, where
    every read of a tensor's value shows, from the end of one forward to the start of the next.
    The forwards' own reads are the model's (transformers' attention-mask helpers read the mask
    on every forward, as in its own generate): counted apart, not asserted."""
    from safecode_kernels.hf import generation

    model, processor, inputs, *_ = llava
    prompt_len = inputs["input_ids"].shape[1]

    class Stop(StoppingCriteria):  # row 0 stops after two new tokens (then pads), both after five
        def __call__(self, input_ids, scores, **kwargs):
            new = input_ids.shape[1] - prompt_len
            return torch.tensor([new >= 2, new >= 5])

    settings = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9) if sampled else {}
    if stop != "eos":
        settings["eos_token_id"] = []  # no stop at EOS: every step runs
    if stop == "criterion":
        settings["stopping_criteria"] = StoppingCriteriaList([Stop()])
    # The refusal set's mask is built once per set and device (a first run builds it).
    refusal = sk.RefusalVocabulary.from_tokenizer(processor.tokenizer)
    hub_generate(llava, refusal=refusal, **settings)

    counter = HostReads(monkeypatch)
    marks = []  # the count at every forward's start and end, and at the loop's end
    made, decode = generation.get_adapter, generation._decode

    def marked_adapter(model, processor):
        adapter = made(model, processor)
        forward = adapter.forward

        def marked_forward(*args, **kwargs):
            marks.append(counter.count)
            out = forward(*args, **kwargs)
            marks.append(counter.count)
            return out

        adapter.forward = marked_forward
        return adapter

    def marked_decode(*args, **kwargs):
        out = decode(*args, **kwargs)
        marks.append(counter.count)
        return out

    monkeypatch.setattr(generation, "get_adapter", marked_adapter)
    monkeypatch.setattr(generation, "_decode", marked_decode)
    streamer = Recorder() if streamed else None
    torch.manual_seed(0)
    with counter:
        out = hub_generate(llava, refusal=refusal, streamer=streamer, **settings)
    new = out.shape[1] - prompt_len
    steps = [end - start for start, end in zip(marks[1::2], marks[2::2])]
    assert new == (5 if stop == "criterion" else NEW) and steps == [1] * new
    if stop == "criterion":
        assert out[0, prompt_len + 2 :].tolist() == [model.generation_config.pad_token_id] * 3
    if streamed:
        torch.testing.assert_close(torch.stack(streamer.values[1:], dim=1), out[:, prompt_len:])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampling_draws_what_generate_draws(llava, seed):
    """Plain sampled generation (no steered step) draws the tokens ``model.generate`` draws
    with torch.multinomial from the same seed: the loop's draw without the host check is the
    same draw."""
    model, _, inputs, *_ = llava
    settings = dict(do_sample=True, temperature=0.7, top_k=20, max_new_tokens=NEW)
    torch.manual_seed(seed)
    got = safecode_hf_generate(model, **inputs, verdicts=VERDICTS, steer_steps=0, backend=BACKEND, **settings)
    torch.manual_seed(seed)
    want = model.generate(**inputs, **settings)
    torch.testing.assert_close(got, want)


def test_choose_draws_what_multinomial_draws():
    """``_choose``'s sampled tokens equal ``torch.multinomial(probs, 1)``'s from the same
    generator state, which both leave alike; greedy takes the argmax; the noise it returns
    draws the same tokens again."""
    from transformers import GenerationConfig

    from safecode_kernels.hf.generation import _choose

    scores = torch.randn(64, 500) * torch.linspace(0.1, 20, 64)[:, None]  # from flat to peaked rows
    ids, unfinished, processors, criteria = (
        torch.zeros(64, 3, dtype=torch.int64),
        torch.ones(64, dtype=torch.bool),
        LogitsProcessorList(),
        StoppingCriteriaList(),
    )
    torch.manual_seed(7)
    want = torch.multinomial(scores.softmax(-1), num_samples=1).squeeze(1)
    after_want = torch.rand(4)
    torch.manual_seed(7)
    choice = _choose(scores, None, ids, unfinished, processors, criteria, GenerationConfig(do_sample=True), None)
    assert torch.equal(choice.tokens, want) and torch.equal(torch.rand(4), after_want)
    assert choice.bad_draw.tolist() == [False, False] and choice.unfinished.all()
    torch.testing.assert_close(choice.input_ids, torch.cat([ids, want[:, None]], dim=1))
    again = _choose(scores, choice.noise, ids, unfinished, processors, criteria, GenerationConfig(do_sample=True), None)
    assert torch.equal(again.tokens, want)
    greedy = _choose(scores, None, ids, unfinished, processors, criteria, GenerationConfig(do_sample=False), None)
    assert torch.equal(greedy.tokens, scores.argmax(-1)) and greedy.noise is None and greedy.bad_draw is None


@pytest.mark.parametrize("steered", [False, True], ids=["plain", "steered"])
def test_a_bad_distribution_raises_what_multinomial_raises(llava, steered):
    """A sampled step whose probabilities hold NaN raises torch.multinomial's own error."""

    class NaNRow(LogitsProcessor):  # at the fifth step (plain) or the second (steered)
        calls = 0

        def __call__(self, input_ids, scores):
            self.calls += 1
            if self.calls == (2 if steered else 5):
                scores = scores.clone()
                scores[1, 4] = float("nan")
            return scores

    probs = torch.zeros(2, 8)
    probs[1, 4] = float("nan")
    with pytest.raises(RuntimeError) as reference:
        torch.multinomial(probs, 1)
    with pytest.raises(RuntimeError, match=re.escape(str(reference.value))):
        hub_generate(llava, do_sample=True, logits_processor=LogitsProcessorList([NaNRow()]))


def test_nan_logits_in_a_steered_step_raise_the_step_error(llava):
    """NaN in the noised branch's logits raises the StepError ``safecode_step`` raises."""
    model, calls = llava[0], []

    def poison(module, args, output):  # the first decoding step's noised row 0
        calls.append(1)
        if len(calls) == 2:
            output = output.clone()
            output[2, -1, 7] = float("nan")
        return output

    handle = model.get_output_embeddings().register_forward_hook(poison)
    try:
        with pytest.raises(sk.StepError, match=r"logits_noised row 0 contains NaN"):
            hub_generate(llava)
    finally:
        handle.remove()


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_rows_the_step_left_undecided_are_recomputed(llava, monkeypatch, sampled):
    """A steered row whose status word says the Triton merge could not decide it exactly has
    its logits recomputed by the reference, and its token chosen again (with the same noise
    when sampled): the answer is the one a plain run gives."""
    from safecode_kernels.hf import generation
    from safecode_kernels.ops.codes import FALLBACK_FLAG

    settings = dict(do_sample=True, temperature=0.7, top_k=20) if sampled else {}
    settings.update(return_dict_in_generate=True, output_scores=True)
    torch.manual_seed(0)
    want = hub_generate(llava, **settings)
    launch, launched = generation.launch_step, []

    def undecided_row_1(*args):
        pending = launch(*args)
        pending.logits = pending.logits.clone()
        pending.logits[1] = 0.0  # wrong, as an undecided row's may be
        pending.status = torch.tensor([0, FALLBACK_FLAG], dtype=torch.int32)
        launched.append(pending)
        return pending

    monkeypatch.setattr(generation, "launch_step", undecided_row_1)
    torch.manual_seed(0)
    got = hub_generate(llava, **settings)
    assert len(launched) == STEPS
    torch.testing.assert_close(got.sequences, want.sequences)
    torch.testing.assert_close(got.scores, want.scores)
