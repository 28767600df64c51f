"""``safecode-kernels demo --toy``: on the hand-nudged toy model the verdict decides the opening
exactly as the lean and the bias say (the contrast scales the 0.6 lean by 1 - alpha, about 0.4
or 0.5, and the bias is 1)."""

from __future__ import annotations

import json

import pytest

from safecode_kernels.app import cli
from safecode_kernels.app.toy import ANSWER, LEANS, REFUSAL, format_toy, nudge, run_toy


@pytest.fixture(scope="module")
def answers():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_toy()
    finally:
        torch.set_num_threads(threads)


def test_the_verdict_decides_the_opening(answers):
    got = {(a.model, a.verdict): a for a in answers}
    assert set(got) == {(m, v) for m in LEANS for v in ("none", "unsafe", "safe")}
    for (model, verdict), answer in got.items():
        assert answer.text in (REFUSAL, ANSWER) and answer.refused == (answer.text == REFUSAL)
        leans_to_refuse = LEANS[model] > 0
        # unsafe: +1 beats a gap under 1; safe: -1 undoes a lead under 1; none: the model's own lean.
        want = {"unsafe": True, "safe": False, "none": leans_to_refuse}[verdict]
        assert answer.refused is want, (model, verdict, answer.text)
    text = format_toy(answers)
    assert "TOY" in text and "NUDGED IN CODE" in text and "not trained" in text
    assert text.count("<- the verdict's bias made it refuse") == 1
    assert text.count("<- the verdict's bias removed the refusal") == 1


def test_nudge_needs_distinct_path_tokens_and_room():
    from safecode_kernels.testing.tiny import build_llava, demo_spec

    model, processor = build_llava(demo_spec(32, 1, 28), 0)
    start = processor.tokenizer.encode("I", add_special_tokens=False)[0]  # also the refusal's first token
    with pytest.raises(ValueError, match="distinct tokens"):
        nudge(model, processor.tokenizer, start, 0.6)


def test_demo_toy_command(capsys, answers, monkeypatch):
    import safecode_kernels.app.toy as toy

    monkeypatch.setattr(toy, "run_toy", lambda seed, backend: answers)  # the same run, not a second one
    assert cli.main(["demo", "--toy", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["toy"] is True and len(report["answers"]) == 6
    assert cli.main(["demo", "--toy"]) == 0
    assert capsys.readouterr().out.startswith("SafeCoDe toy demo: a TOY model, NUDGED IN CODE")
