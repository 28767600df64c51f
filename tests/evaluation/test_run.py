"""``run_eval`` on a tiny LLaVA and tiny benchmark folders: the lines it writes, resuming, torn
lines, configuration checks, failures isolated per sample, Ctrl-C."""

from __future__ import annotations

import fcntl
import inspect
import json
import os
import signal

import pytest
import torch
from PIL import Image

from safecode_kernels import SafeCoDeDecoder, SteeringParams, StepError, make_noised_image
from safecode_kernels.evaluation import run as run_module
from safecode_kernels.evaluation import store
from safecode_kernels.evaluation.loaders import load_benchmark
from safecode_kernels.evaluation.run import RunAborted, RunLocked, check_resume, run_eval, sample_seed
from safecode_kernels.evaluation.run_config import ConfigMismatch
from safecode_kernels.judges import JudgeConnectionError, JudgeError, Judgement, UnparseableVerdict
from safecode_kernels.testing.tiny import tiny_llava
from safecode_kernels.verdict import Verdict
from tests.evaluation.layouts import make_jsonl, make_mm_safetybench, make_mossbench

STEER, MAX_NEW = 3, 5
RUN = dict(steer_steps=STEER, max_new_tokens=MAX_NEW, progress=False)
DOCUMENTED = {
    "id",
    "benchmark",
    "prompt",
    "image",
    "method",
    "recipe",
    "verdict",
    "caption",
    "response",
    "new_tokens",
    "seconds",
    "error",
}


@pytest.fixture(autouse=True)
def one_thread(single_torch_thread):
    """Every test runs on one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return {
        "moss": make_mossbench(root / "moss", n=6),
        "mm": make_mm_safetybench(root / "mm", scenarios=("01-Illegal_Activitiy",), n=2),
    }


def lines_of(folder):
    return store.read_lines(folder / "generations.jsonl")


def without_seconds(lines):
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


def expected_answer(llava, sample, verdict, steer_steps=STEER, params=None):
    """The answer of one sample alone, straight from the decoder, with its documented noised image."""
    model, processor = llava
    image = Image.open(sample.image).convert("RGB")
    noised = make_noised_image(image, 0.1, generator=torch.Generator().manual_seed(sample_seed(0, sample)))
    result = SafeCoDeDecoder(model, processor, params=params, steer_steps=steer_steps).generate(
        [image], [sample.prompt], [verdict], max_new_tokens=MAX_NEW, noised_images=[noised] if steer_steps else None
    )
    return result.texts[0], len(result.sequences[0])


def test_lines_hold_the_documented_fields(llava, data, tmp_path):
    samples = load_benchmark("mm-safetybench", data["mm"])
    summary = run_eval(*llava, samples, tmp_path / "run", verdict="unsafe", batch_size=4, **RUN)
    lines = lines_of(tmp_path / "run")
    # The builder's documented ids: scenario / qid / image kind.
    assert [line["id"] for line in lines] == [
        f"01-Illegal_Activitiy/{q}/{kind}" for q in (0, 1) for kind in ("SD", "SD_TYPO", "TYPO")
    ]
    assert summary["written"] == summary["saved"] == summary["total"] == len(samples) and summary["errors"] == 0
    for line, sample in zip(lines, samples, strict=True):
        assert set(line) == DOCUMENTED | set(sample.fields)
        assert {k: line[k] for k in sample.fields} == sample.fields
        assert (line["benchmark"], line["prompt"], line["image"]) == (sample.benchmark, sample.prompt, sample.image)
        assert (line["method"], line["recipe"], line["verdict"], line["caption"], line["error"]) == (
            "safecode",
            "paper",
            "unsafe",
            None,
            None,
        )
        assert (line["response"], line["new_tokens"]) == expected_answer(llava, sample, "unsafe")
        assert line["seconds"] > 0
    config = json.loads((tmp_path / "run" / "run.json").read_text())
    assert {
        k: config[k]
        for k in (
            "benchmark",
            "method",
            "recipe",
            "verdict",
            "steer_steps",
            "seed",
            "max_new_tokens",
            "noise_std",
            "batch_size",
            "judge",
        )
    } == {
        "benchmark": "mm-safetybench",
        "method": "safecode",
        "recipe": "paper",
        "verdict": "unsafe",
        "steer_steps": STEER,
        "seed": 0,
        "max_new_tokens": MAX_NEW,
        "noise_std": 0.1,
        "batch_size": 4,
        "judge": None,
    }
    assert config["versions"]["torch"] == torch.__version__


@pytest.mark.parametrize("method", ["base", "vcd"])
def test_base_and_vcd(llava, data, tmp_path, method):
    samples = load_benchmark("mossbench", data["moss"], limit=3)
    run_eval(*llava, samples, tmp_path / method, method=method, verdict="auto", batch_size=2, **RUN)
    params, steer = (None, 0) if method == "base" else (SteeringParams.vcd(), STEER)
    for line, sample in zip(lines_of(tmp_path / method), samples, strict=True):
        assert line["method"] == method and line["verdict"] == "none"
        assert (line["response"], line["new_tokens"]) == expected_answer(llava, sample, "none", steer, params)
    config = json.loads((tmp_path / method / "run.json").read_text())
    assert config["steer_steps"] == steer and config["verdict"] == "none" and config["judge"] is None


def test_answers_do_not_depend_on_batching(llava, data, tmp_path):
    samples = load_benchmark("mossbench", data["moss"])
    for size in (1, 4):
        run_eval(*llava, samples, tmp_path / str(size), verdict="safe", batch_size=size, **RUN)
    assert without_seconds(lines_of(tmp_path / "1")) == without_seconds(lines_of(tmp_path / "4"))


def count_generate_calls(monkeypatch):
    calls = []
    real = SafeCoDeDecoder.generate

    def generate(self, images, prompts, *args, **kwargs):
        calls.append(list(prompts))
        return real(self, images, prompts, *args, **kwargs)

    monkeypatch.setattr(SafeCoDeDecoder, "generate", generate)
    return calls


def test_resume_skips_done_ids(llava, data, tmp_path, monkeypatch):
    samples = load_benchmark("mossbench", data["moss"])
    run_eval(*llava, samples[:2], tmp_path / "run", verdict="safe", batch_size=2, **RUN)
    first = lines_of(tmp_path / "run")
    calls = count_generate_calls(monkeypatch)
    summary = run_eval(*llava, samples, tmp_path / "run", verdict="safe", batch_size=3, **RUN)  # other batch size
    lines = lines_of(tmp_path / "run")
    assert lines[:2] == first
    assert [line["id"] for line in lines] == [s.id for s in samples]
    assert sorted(p for call in calls for p in call) == sorted(s.prompt for s in samples[2:])
    assert (summary["already_done"], summary["written"], summary["remaining"]) == (2, len(samples) - 2, 0)
    assert check_resume(tmp_path / "run", samples, verdict="safe", steer_steps=STEER, max_new_tokens=MAX_NEW) == len(
        samples
    )


def test_torn_last_line_is_redone(llava, data, tmp_path):
    samples = load_benchmark("mossbench", data["moss"], limit=5)
    run_eval(*llava, samples, tmp_path / "whole", verdict="unsafe", batch_size=2, **RUN)
    reference = lines_of(tmp_path / "whole")
    # The same run, cut by a crash in the middle of its second line (batches now fall otherwise).
    run_eval(*llava, samples, tmp_path / "torn", verdict="unsafe", batch_size=2, **RUN)
    path = tmp_path / "torn" / "generations.jsonl"
    data_bytes = path.read_bytes()
    first_end = data_bytes.index(b"\n") + 1
    path.write_bytes(data_bytes[: first_end + 40])
    summary = run_eval(*llava, samples, tmp_path / "torn", verdict="unsafe", batch_size=2, **RUN)
    assert summary["already_done"] == 1 and summary["written"] == len(samples) - 1
    assert without_seconds(lines_of(tmp_path / "torn")) == without_seconds(reference)
    assert path.read_bytes().count(b"\n") == len(samples)


def test_config_mismatch_is_refused(llava, data, tmp_path):
    samples = load_benchmark("mossbench", data["moss"], limit=2)
    config = {"model": "/models/tiny", "data": str(data["moss"]), "limit": 2}
    run_eval(*llava, samples, tmp_path / "run", verdict="safe", config=config, **RUN)
    before = (tmp_path / "run" / "generations.jsonl").read_bytes()
    changes = [
        (dict(verdict="unsafe"), "verdict"),
        (dict(max_new_tokens=MAX_NEW + 1), "max_new_tokens"),
        (dict(config={**config, "model": "/models/other"}), "model"),
        (dict(seed=1), "seed"),
        (dict(method="base"), "method"),
    ]
    for change, field in changes:
        kwargs = {**RUN, "verdict": "safe", "config": config, **change}
        if change.get("method") == "base":
            kwargs["verdict"] = "none"
        with pytest.raises(ConfigMismatch, match=field) as info:
            run_eval(*llava, samples, tmp_path / "run", **kwargs)
        assert field in info.value.fields
        with pytest.raises(ConfigMismatch, match=field):
            check_resume(tmp_path / "run", samples, **{k: v for k, v in kwargs.items() if k != "progress"})
    assert (tmp_path / "run" / "generations.jsonl").read_bytes() == before
    # The limit, the batch size and the versions may change.
    summary = run_eval(
        *llava, samples, tmp_path / "run", verdict="safe", batch_size=1, config={**config, "limit": None}, **RUN
    )
    assert summary["written"] == 0 and summary["already_done"] == 2


def test_generations_without_run_json_are_refused(llava, data, tmp_path):
    samples = load_benchmark("mossbench", data["moss"], limit=1)
    run_eval(*llava, samples, tmp_path / "run", verdict="safe", **RUN)
    (tmp_path / "run" / "run.json").unlink()
    with pytest.raises(ValueError, match="run.json does not"):
        run_eval(*llava, samples, tmp_path / "run", verdict="safe", **RUN)


def test_bad_image_is_an_error_line(llava, tmp_path):
    path = make_jsonl(tmp_path / "data", n=4)
    samples = load_benchmark("jsonl", path)
    (tmp_path / "data" / "images" / "s1.png").write_bytes(b"not a png")
    summary = run_eval(*llava, samples, tmp_path / "run", verdict="unsafe", batch_size=4, **RUN)
    lines = lines_of(tmp_path / "run")
    assert [line["id"] for line in lines] == [s.id for s in samples] and summary["errors"] == 1
    bad = lines[1]
    assert bad["error"].startswith("image: DataError: ") and "s1.png" in bad["error"]
    assert bad["response"] is None and bad["new_tokens"] is None
    for line, sample in zip(lines, samples, strict=True):
        if line["id"] != "s1":
            assert line["error"] is None and line["response"] == expected_answer(llava, sample, "unsafe")[0]


def test_decoder_failure_is_isolated_per_sample(llava, data, tmp_path, monkeypatch):
    samples = load_benchmark("mossbench", data["moss"], limit=4)
    poisoned = samples[2].prompt
    real = SafeCoDeDecoder.generate
    calls = []

    def generate(self, images, prompts, *args, **kwargs):
        calls.append(len(prompts))
        if poisoned in prompts:
            raise StepError("row 0 has NaN logits")
        return real(self, images, prompts, *args, **kwargs)

    monkeypatch.setattr(SafeCoDeDecoder, "generate", generate)
    summary = run_eval(*llava, samples, tmp_path / "run", verdict="safe", batch_size=4, **RUN)
    lines = lines_of(tmp_path / "run")
    assert calls == [4, 1, 1, 1, 1]  # the batch, then each sample alone
    assert summary["errors"] == 1 and lines[2]["error"] == "generate: StepError: row 0 has NaN logits"
    for line, sample in zip(lines, samples, strict=True):
        if sample.prompt != poisoned:
            assert line["response"] == expected_answer(llava, sample, "safe")[0]


def test_a_request_the_decoder_ended_alone_is_an_error_line(llava, data, tmp_path, monkeypatch):
    """A request the decoder ended at a bad step (``GenerationResult.errors``) is an error line
    with its answer so far; the batch is not redone sample by sample."""
    samples = load_benchmark("mossbench", data["moss"], limit=4)
    poisoned = samples[2].prompt
    real = SafeCoDeDecoder.generate
    calls = []

    def generate(self, images, prompts, *args, **kwargs):
        calls.append(len(prompts))
        result = real(self, images, prompts, *args, **kwargs)
        result.errors[prompts.index(poisoned)] = "step 1: the real image branch's next-token logits hold NaN"
        return result

    monkeypatch.setattr(SafeCoDeDecoder, "generate", generate)
    summary = run_eval(*llava, samples, tmp_path / "run", verdict="safe", batch_size=4, **RUN)
    lines = lines_of(tmp_path / "run")
    assert calls == [4] and summary["errors"] == 1
    assert lines[2]["error"] == "generate: step 1: the real image branch's next-token logits hold NaN"
    assert lines[2]["response"] == expected_answer(llava, samples[2], "safe")[0]
    assert [line["error"] for k, line in enumerate(lines) if k != 2] == [None] * 3


def test_many_failures_in_a_row_stop_the_run(llava, data, tmp_path, monkeypatch):
    samples = load_benchmark("mossbench", data["moss"])

    def generate(self, *args, **kwargs):
        raise RuntimeError("weights are broken")

    monkeypatch.setattr(SafeCoDeDecoder, "generate", generate)
    with pytest.raises(RunAborted, match="3 samples in a row failed.*weights are broken"):
        run_eval(*llava, samples, tmp_path / "run", verdict="safe", batch_size=3, max_consecutive_errors=3, **RUN)
    assert [line["error"] for line in lines_of(tmp_path / "run")] == ["generate: RuntimeError: weights are broken"] * 3
    monkeypatch.undo()
    # --retry-errors generates them again.
    summary = run_eval(*llava, samples, tmp_path / "run", verdict="safe", batch_size=3, retry_errors=True, **RUN)
    assert summary["written"] == len(samples) and summary["errors"] == 0
    latest = {line["id"]: line for line in lines_of(tmp_path / "run")}
    assert all(line["error"] is None for line in latest.values()) and len(latest) == len(samples)


class KeywordJudge:
    """Unsafe when the prompt names an odd scene; fails on scene 3 (unparseable) or everywhere."""

    def __init__(self, down=False):
        self.down, self.calls = down, []

    def judge(self, images, prompts):
        self.calls.append(len(prompts))
        if self.down:
            raise JudgeConnectionError("cannot reach the server at http://127.0.0.1:9/v1")
        if any("scene 3" in p for p in prompts):
            raise UnparseableVerdict("request 0: the judge's answer names no verdict: 'hmm'", "hmm")
        return [
            Judgement(Verdict.UNSAFE if int(p[-2]) % 2 else Verdict.SAFE, f"caption of {p[-2]}", "x") for p in prompts
        ]


def test_auto_verdicts_come_from_the_judge(llava, data, tmp_path):
    samples = load_benchmark("mossbench", data["moss"])
    judge = KeywordJudge()
    summary = run_eval(*llava, samples, tmp_path / "run", judge=judge, batch_size=3, **RUN)
    lines = lines_of(tmp_path / "run")
    assert judge.calls == [3, 1, 1, 1, 3] and summary["errors"] == 1
    for line, sample in zip(lines, samples, strict=True):
        scene = int(sample.id)
        if scene == 3:
            assert line["error"].startswith("judge: UnparseableVerdict: ") and line["verdict"] is None
            continue
        verdict = "unsafe" if scene % 2 else "safe"
        assert (line["verdict"], line["caption"]) == (verdict, f"caption of {scene}")
        assert line["response"] == expected_answer(llava, sample, verdict)[0]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["judge"] == "KeywordJudge"


def test_a_judge_that_is_down_stops_the_run(llava, data, tmp_path):
    samples = load_benchmark("mossbench", data["moss"])
    run_eval(*llava, samples[:2], tmp_path / "run", judge=KeywordJudge(), batch_size=2, **RUN)
    with pytest.raises(JudgeError, match="cannot reach"):
        run_eval(*llava, samples, tmp_path / "run", judge=KeywordJudge(down=True), batch_size=2, **RUN)
    assert [line["id"] for line in lines_of(tmp_path / "run")] == [s.id for s in samples[:2]]


def test_ctrl_c_stops_after_the_batch_in_flight(llava, data, tmp_path, monkeypatch):
    samples = load_benchmark("mossbench", data["moss"])
    previous = signal.getsignal(signal.SIGINT)
    real = SafeCoDeDecoder.generate

    def generate(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the first batch is generated
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SafeCoDeDecoder, "generate", generate)
    summary = run_eval(*llava, samples, tmp_path / "run", verdict="safe", batch_size=2, **RUN)
    assert summary["interrupted"] and summary["saved"] == 2 and summary["remaining"] == len(samples) - 2
    assert [line["id"] for line in lines_of(tmp_path / "run")] == [s.id for s in samples[:2]]
    assert signal.getsignal(signal.SIGINT) is previous

    def twice(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the second one aborts at once
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SafeCoDeDecoder, "generate", twice)
    with pytest.raises(KeyboardInterrupt):
        run_eval(*llava, samples, tmp_path / "run", verdict="safe", batch_size=2, **RUN)
    assert signal.getsignal(signal.SIGINT) is previous
    assert len(lines_of(tmp_path / "run")) == 2


def test_a_second_writer_is_refused(llava, data, tmp_path):
    samples = load_benchmark("mossbench", data["moss"], limit=1)
    (tmp_path / "run").mkdir()
    fd = os.open(tmp_path / "run", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds the folder
        with pytest.raises(RunLocked, match="another run is writing"):
            run_eval(*llava, samples, tmp_path / "run", verdict="safe", **RUN)
    finally:
        os.close(fd)
    run_eval(*llava, samples, tmp_path / "run", verdict="safe", **RUN)
    assert len(lines_of(tmp_path / "run")) == 1


def test_argument_errors(llava, data, tmp_path):
    samples = load_benchmark("mossbench", data["moss"], limit=2)
    out = tmp_path / "run"
    cases = [
        (dict(method="beam"), "method must be one of"),
        (dict(verdict="maybe"), "verdict must be one of"),
        (dict(verdict="auto"), "needs a judge"),
        (dict(method="base", verdict="unsafe"), "uses no verdict"),
        (dict(method="base", recipe="released"), "method 'base' uses no recipe"),
        (dict(method="vcd", recipe="released"), "method 'vcd' uses no recipe"),
        (dict(verdict="safe", batch_size=0), "batch_size must be an int >= 1"),
        (dict(verdict="safe", max_new_tokens=0), "max_new_tokens must be None"),
        (dict(verdict="safe", config={"seed": 3}), "config may not set seed"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            run_eval(*llava, samples, out, progress=False, **kwargs)
    with pytest.raises(ValueError, match="duplicate sample id '1'"):
        run_eval(*llava, [samples[0], samples[0]], out, verdict="safe", progress=False)
    clash = type(samples[0])("9", "mossbench", "hi", samples[0].image, {"response": "x"})
    with pytest.raises(ValueError, match="field\\(s\\) response"):
        run_eval(*llava, [clash], out, verdict="safe", progress=False)
    assert not out.exists() or not (out / "generations.jsonl").exists()


def test_released_recipe(llava, data, tmp_path, monkeypatch):
    samples = load_benchmark("mossbench", data["moss"], limit=2)
    if "recipe" not in inspect.signature(SafeCoDeDecoder).parameters:
        with pytest.raises(run_module.RecipeUnavailable, match="recipe 'released' needs"):
            run_eval(*llava, samples, tmp_path / "run", recipe="released", verdict="unsafe", **RUN)
        return
    run_eval(*llava, samples, tmp_path / "run", recipe="released", verdict="unsafe", **RUN)
    model, processor = llava
    for line, sample in zip(lines_of(tmp_path / "run"), samples, strict=True):
        image = Image.open(sample.image).convert("RGB")
        noised = make_noised_image(image, 0.1, generator=torch.Generator().manual_seed(sample_seed(0, sample)))
        want = SafeCoDeDecoder(model, processor, steer_steps=STEER, recipe="released").generate(
            [image], [sample.prompt], ["unsafe"], max_new_tokens=MAX_NEW, do_sample=False, noised_images=[noised]
        )
        assert line["recipe"] == "released" and line["response"] == want.texts[0]

    class OldDecoder:  # an installed decoder from before the recipes
        def __init__(self, model, processor, params=None, steer_steps=5, noise_std=0.1, seed=0):
            pass

    import safecode_kernels.decoding as decoding

    monkeypatch.setattr(decoding, "SafeCoDeDecoder", OldDecoder)
    with pytest.raises(run_module.RecipeUnavailable, match="recipe 'released' needs"):
        run_eval(*llava, samples, tmp_path / "other", recipe="released", verdict="unsafe", **RUN)
