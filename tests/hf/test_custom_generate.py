"""SafeCoDe as a Hugging Face ``custom_generate`` method (safecode_kernels/hf)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers.generation import BaseStreamer, StoppingCriteria, StoppingCriteriaList

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


def test_streamer_receives_the_prompt_then_every_token(llava):
    class Recorder(BaseStreamer):
        def __init__(self):
            self.values, self.ended = [], 0

        def put(self, value):
            self.values.append(value)

        def end(self):
            self.ended += 1

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
