"""The resumable score loop (scoring.scorer): files written, resuming, errors, and one real HTTP run."""

from __future__ import annotations

import io
import json
import sys
import threading
import time

import pytest
from PIL import Image

from safecode_kernels.evaluation.scoring import ChatClient, read_scores, score
from safecode_kernels.evaluation.scoring import report as report_module
from safecode_kernels.evaluation.scoring.rubrics import ADVICE_PROMPT, HARM_PROMPT
from safecode_kernels.judges import JudgeHTTPError
from tests.judges.chat_server import ChatServer, request_text

MOSS_TYPES = ("Exaggerated Risk", "Negated Harm", "Counterintuitive Interpretation")


@pytest.fixture(autouse=True)
def no_chart(request, monkeypatch):
    """Only the end-to-end MOSSBench test draws report.png (matplotlib takes ~0.4 s a chart)."""
    if request.node.name != "test_mossbench_scores_and_report":
        monkeypatch.setattr(report_module, "plot_metrics", lambda report, path: None)


class FakeJudge:
    """``complete(messages)``: the answer ``answers[response]`` for the response quoted in the prompt.
    Records every call (thread-safe) and the most calls ever in flight at once."""

    model = "fake-judge"

    def __init__(self, answers: dict[str, str], fail_after: int | None = None, delay: float = 0.0):
        self.answers, self.fail_after, self.delay = answers, fail_after, delay
        self.calls: list[list[dict]] = []
        self.active = self.max_active = 0
        self._lock = threading.Lock()

    def complete(self, messages):
        with self._lock:
            if self.fail_after is not None and len(self.calls) >= self.fail_after:
                raise JudgeHTTPError("judge down (HTTP 503)", 503)
            self.calls.append(messages)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.delay)
            text = request_text({"messages": messages})
            return next(answer for response, answer in self.answers.items() if response in text)
        finally:
            with self._lock:
                self.active -= 1


def write_run(directory, rows, tail: str = "") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "generations.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        f.write(tail)


def generation(i, benchmark, response, **fields) -> dict:
    return {
        "id": str(i),
        "benchmark": benchmark,
        "prompt": f"prompt {i}",
        "image": fields.pop("image", None),
        "method": "safecode",
        "verdict": "safe",
        "caption": None,
        "response": response,
        "new_tokens": 5,
        "seconds": 0.1,
        **fields,
    }


def scores_lines(directory) -> list[dict]:
    return [json.loads(line) for line in (directory / "scores.jsonl").read_text().splitlines()]


# ----- MOSSBench end to end with a fake judge ---------------------------------------------------
@pytest.fixture
def moss_run(tmp_path):
    image = tmp_path / "img.png"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(image)
    run = tmp_path / "moss-safecode"
    answers = {}
    rows = []
    # (type, judge answer): 3 refused + 2 complied on typed samples, 1 unparsed, 1 generation error.
    script = [
        (MOSS_TYPES[0], "Description: a red square.\nScore: 1\nReason: it declined."),
        (MOSS_TYPES[0], "Description: a red square.\nScore: 0\nReason: it helped."),
        (MOSS_TYPES[1], "<think>Score: 0?</think>Description: red.\n**Score:** 1\nReason: refused."),
        (MOSS_TYPES[1], "Description: red.\nScore: 0\nReason: it helped."),
        (MOSS_TYPES[2], "Description: red.\nScore: 1\nReason: lectured."),
        (MOSS_TYPES[2], "I am not sure what to say."),
    ]
    for i, (kind, answer) in enumerate(script):
        answers[f"response-{i}"] = answer
        rows.append(generation(i, "mossbench", f"response-{i}", type=kind, image=str(image)))
    rows.append(generation(6, "mossbench", None, type=MOSS_TYPES[0], image=str(image), error="CUDA OOM"))
    write_run(run, rows)
    return run, answers


def test_mossbench_scores_and_report(moss_run, capsys):
    run, answers = moss_run
    judge = FakeJudge(answers)
    report = score(run, judge=judge, concurrency=2)
    assert len(judge.calls) == 6  # the failed generation is not judged
    content = judge.calls[0][-1]["content"]
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,")  # the judge sees the image
    assert "prompt" in content[0]["text"] and "response-" in content[0]["text"]
    assert {r["id"]: r["label"] for r in scores_lines(run)} == {"0": 1, "1": 0, "2": 1, "3": 0, "4": 1, "5": None}
    assert all(r["answer"] == answers[f"response-{r['id']}"] and r["scorer"] == "llm" for r in scores_lines(run))
    expected = {
        "refusal_rate": 3 / 5,
        "refusal_rate_by_type": {MOSS_TYPES[0]: 1 / 2, MOSS_TYPES[1]: 1 / 2, MOSS_TYPES[2]: 1 / 1},
    }
    assert report["metrics"] == expected
    assert (report["benchmark"], report["n"], report["unparsed"], report["errors"]) == ("mossbench", 6, ["5"], 1)
    assert (report["run"], report["methods"], report["judge"], report["generations"]) == (
        "moss-safecode",
        ["safecode"],
        "fake-judge",
        7,
    )
    assert json.loads((run / "report.json").read_text()) == report
    assert "| refusal_rate | 0.600 |" in (run / "report.md").read_text()
    pytest.importorskip("matplotlib")
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"
    err = capsys.readouterr().err
    assert "scoring mossbench" not in err  # stderr is no terminal here: no bar in a log file


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_shows_on_a_terminal(moss_run, monkeypatch):
    run, answers = moss_run
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    score(run, judge=FakeJudge(answers), concurrency=2)
    assert "scoring mossbench" in terminal.getvalue() and "sample" in terminal.getvalue()  # the tqdm bar


def test_resumes_after_a_judge_failure(moss_run):
    run, answers = moss_run
    with pytest.raises(JudgeHTTPError, match="judge down") as info:
        score(run, judge=FakeJudge(answers, fail_after=4), concurrency=1, progress=False)
    assert any("while judging sample" in note for note in info.value.__notes__)
    assert [r["id"] for r in scores_lines(run)] == ["0", "1", "2", "3"]  # each judgement kept as it finished
    assert not (run / "report.json").exists()
    judge = FakeJudge(answers)
    report = score(run, judge=judge, progress=False)
    assert len(judge.calls) == 2  # only what was missing
    assert sorted(r["id"] for r in scores_lines(run)) == ["0", "1", "2", "3", "4", "5"]
    assert report["metrics"]["refusal_rate"] == 3 / 5
    # Nothing left to judge: the report is rebuilt from scores.jsonl alone.
    assert score(run, judge=FakeJudge({}), progress=False) == report


def test_a_cut_short_last_score_line_is_redone(moss_run):
    run, answers = moss_run
    score(run, judge=FakeJudge(answers), progress=False)
    lines = (run / "scores.jsonl").read_text().splitlines()
    cut_id = json.loads(lines[-1])["id"]
    (run / "scores.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:12])
    judge = FakeJudge(answers)
    report = score(run, judge=judge, progress=False)
    assert len(judge.calls) == 1 and scores_lines(run)[-1]["id"] == cut_id
    assert report["n"] == 6


def test_bounded_concurrency(tmp_path):
    run = tmp_path / "figstep"
    write_run(run, [generation(i, "figstep", f"response-{i}", category="c") for i in range(12)])
    judge = FakeJudge({f"response-{i}": "unsafe" for i in range(12)}, delay=0.02)
    score(run, judge=judge, concurrency=3, progress=False)
    assert len(judge.calls) == 12 and 1 < judge.max_active <= 3


def test_mm_safetybench_rubrics_and_template(tmp_path):
    run = tmp_path / "mmsb"
    rows = [
        generation(0, "mm-safetybench", "r0", scenario="01-Illegal_Activitiy", kind="SD", question="Q-harm"),
        generation(1, "mm-safetybench", "r1", scenario="12-Health_Consultation", kind="TYPO", question="Q-med"),
        generation(2, "mm-safetybench", "r2", scenario="12-Health_Consultation", kind="SD_TYPO", question="Q-m2"),
    ]
    write_run(run, rows)
    judge = FakeJudge({"r0": "Verdict: unsafe", "r1": "It declined.\nsafe", "r2": "unsafe"})
    report = score(run, judge=judge, progress=False)
    prompts = {request_text({"messages": m}): m for m in judge.calls}
    by_question = {q: text for text in prompts for q in ("Q-harm", "Q-med") if q in text}
    assert by_question["Q-harm"].startswith(HARM_PROMPT[:60]) and by_question["Q-med"].startswith(ADVICE_PROMPT[:60])
    assert report["metrics"] == {
        "attack_rate": 2 / 3,
        "attack_rate_by_scenario": {"01-Illegal_Activitiy": 1.0, "12-Health_Consultation": 0.5},
        "attack_rate_by_kind": {"SD": 1.0, "SD_TYPO": 1.0, "TYPO": 0.0},
    }

    template = tmp_path / "official.txt"
    template.write_text("OFFICIAL Q={question} R={response}", encoding="utf-8")
    (run / "scores.jsonl").unlink()
    judge = FakeJudge({"r0": "unsafe", "r1": "safe", "r2": "safe"})
    report = score(run, judge=judge, judge_template=template, progress=False)
    assert sorted(request_text({"messages": m}) for m in judge.calls) == [
        "OFFICIAL Q=Q-harm R=r0",
        "OFFICIAL Q=Q-m2 R=r2",
        "OFFICIAL Q=Q-med R=r1",
    ]
    assert report["judge_template"] == str(template) and report["metrics"]["attack_rate"] == 1 / 3


def test_mssbench(tmp_path):
    run = tmp_path / "mss"
    rows, answers = [], {}
    for i, (setting, kind, cls) in enumerate(
        [
            ("chat", "safe", 2),
            ("chat", "safe", 0),
            ("chat", "unsafe", 1),
            ("embodied", "unsafe", 3),
            ("embodied", "safe", 3),
        ]
    ):
        rows.append(generation(i, "mssbench", f"resp{i}", setting=setting, image_kind=kind))
        answers[f"resp{i}"] = f"Reasoning.\n<answer>{cls}"
    write_run(run, rows)
    metrics = score(run, judge=FakeJudge(answers), progress=False)["metrics"]
    assert metrics == {
        "accuracy": (2 / 3 + 1 / 2) / 2,
        "accuracy_safe": 2 / 3,
        "accuracy_unsafe": 1 / 2,
        "by_setting": {
            "chat": {"accuracy": 0.75, "accuracy_safe": 0.5, "accuracy_unsafe": 1.0},
            "embodied": {"accuracy": 0.5, "accuracy_safe": 1.0, "accuracy_unsafe": 0.0},
        },
    }


def test_refusal_strings_need_no_judge(tmp_path):
    run = tmp_path / "jsonl-run"
    write_run(
        run,
        [
            generation(0, "jsonl", "I can\u2019t help with that.", category="a"),
            generation(1, "jsonl", "Sure: step one...", category="a"),
            generation(2, "jsonl", "As an AI, I won't.", category="b"),
        ],
    )
    report = score(run, scorer="refusal-strings", progress=False)
    assert [(r["label"], r["answer"]) for r in scores_lines(run)] == [(1, "I can't"), (0, None), (1, "as an AI")]
    assert report["metrics"] == {"refusal_rate": 2 / 3, "refusal_rate_by_category": {"a": 0.5, "b": 1.0}}
    assert report["judge"] is None and report["unparsed"] == []
    with pytest.raises(ValueError, match="written by scorer 'refusal-strings'"):
        score(run, judge=FakeJudge({}), progress=False)  # labels of two scorers never mix


def test_generations_file_rules(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="run/generations.jsonl"):
        score(run, scorer="refusal-strings")
    rows = [generation(0, "hades", "I cannot.", category="x"), generation(1, "hades", "ok", category="x")]
    write_run(run, rows, tail='{"id": "2", "bench')  # a crash cut the last line short
    with pytest.warns(UserWarning, match="cut-short last line 3"):
        report = score(run, scorer="refusal-strings", progress=False)
    assert report["n"] == 2

    write_run(run, rows[:1], tail='{"id": "broken\n' + json.dumps(rows[1]) + "\n")
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        score(run, scorer="refusal-strings", progress=False)
    write_run(run, [rows[0], generation(1, "figstep", "ok")])
    with pytest.raises(ValueError, match="mixes benchmarks"):
        score(run, scorer="refusal-strings", progress=False)
    write_run(run, [])
    with pytest.raises(ValueError, match="holds no generation"):
        score(run, scorer="refusal-strings", progress=False)


def test_argument_errors(tmp_path, moss_run):
    run, _ = moss_run
    with pytest.raises(ValueError, match="needs a judge"):
        score(run)
    with pytest.raises(TypeError, match="complete"):
        score(run, judge=object())
    with pytest.raises(ValueError, match="scorer must be"):
        score(run, scorer="vibes")
    with pytest.raises(ValueError, match="concurrency"):
        score(run, judge=FakeJudge({}), concurrency=0)
    bad = tmp_path / "bad.txt"
    bad.write_text("{question} {response} {image}")
    with pytest.raises(ValueError, match=r"unknown placeholder\(s\) \{image\}"):
        score(run, judge=FakeJudge({}), judge_template=bad)
    assert not (run / "scores.jsonl").exists()


def test_hub_images_need_a_loader(tmp_path):
    run = tmp_path / "moss-hub"
    write_run(run, [generation(0, "mossbench", "resp", type=MOSS_TYPES[1], image="hf://moss/test/0")])
    judge = FakeJudge({"resp": "Score: 0"})
    with pytest.raises(FileNotFoundError, match="image_loader"):
        score(run, judge=judge, progress=False)
    assert judge.calls == []  # failed before any request
    seen = []
    report = score(
        run, judge=judge, progress=False, image_loader=lambda ref: seen.append(ref) or Image.new("RGB", (4, 4))
    )
    assert seen == ["hf://moss/test/0"] and report["metrics"]["refusal_rate"] == 0.0


# ----- the real HTTP path -------------------------------------------------------------------
def test_real_http_judge(tmp_path, monkeypatch):
    """ChatClient -> a chat-completions server on 127.0.0.1; report.json equals the counts of its answers."""

    def answer(body: dict) -> str:
        text = request_text(body)
        if "BROKEN" in text:
            return "I would rather not judge this."
        return "The reply gives working steps.\nunsafe" if "STEPS" in text else "It refuses.\nVerdict: safe"

    responses = ["STEPS 1", "no", "STEPS 2", "BROKEN", "no", "STEPS 3", "no", "no"]
    categories = ["a", "a", "b", "b", "a", "b", "c", "a"]
    run = tmp_path / "figstep-base"
    pairs = enumerate(zip(responses, categories, strict=True))
    write_run(run, [generation(i, "figstep", r, category=c) for i, (r, c) in pairs])
    monkeypatch.delenv("SAFECODE_SCORING_NO_KEY", raising=False)
    server = ChatServer(default=answer).start()
    try:
        with ChatClient(server.base_url, "judge-model", api_key_env="SAFECODE_SCORING_NO_KEY", timeout=5.0) as judge:
            report = score(run, judge=judge, concurrency=4, progress=False)
    finally:
        server.stop()

    assert len(server.requests) == 8
    given = [answer(r["body"]) for r in server.requests]  # what the server answered
    unsafe, safe = sum(a.endswith("\nunsafe") for a in given), sum(a.endswith("Verdict: safe") for a in given)
    assert (unsafe, safe) == (3, 4)
    by_id = {r["id"]: r for r in scores_lines(run)}
    assert sorted(by_id[str(i)]["answer"] for i in range(8)) == sorted(given)
    assert report["metrics"] == {
        "attack_rate": unsafe / (unsafe + safe),
        "attack_rate_by_category": {"a": 1 / 4, "b": 2 / 2, "c": 0 / 1},
    }
    assert report["unparsed"] == ["3"] and report["judge"] == "judge-model"
    assert json.loads((run / "report.json").read_text())["metrics"] == report["metrics"]
    assert read_scores(run)["0"]["label"] == "unsafe"
