"""``safecode-kernels demo``: both decoders agree and the report says what it shows."""

from __future__ import annotations

import json

import pytest
import torch

from safecode_kernels.app import cli
from safecode_kernels.app.demo import format_report, run_demo, token_text


def test_run_demo_small():
    threads = torch.get_num_threads()
    report = run_demo(
        num_requests=3, max_new_tokens=6, steer_steps=3, hidden_size=64, num_layers=2, image_size=56, progress=False
    )
    assert torch.get_num_threads() == threads  # restored
    assert report.agree and report.max_logit_diff < 1e-4
    assert [r.verdict for r in report.requests] == ["unsafe", "safe", "none"]
    for r in report.requests:
        assert len(r.fused_tokens) == 6 and len(r.steering) == 3
        assert [s.token for s in r.steering] == r.fused_tokens[:3]
        for fused, naive in zip(r.steering, r.naive_steering, strict=True):
            assert fused.token == naive.token
            assert abs(fused.refusal_mass_before - naive.refusal_mass_before) < 1e-5
            assert abs(fused.refusal_mass_after - naive.refusal_mass_after) < 1e-5
    unsafe, safe, none = report.requests
    assert all(s.refusal_mass_after >= s.refusal_mass_before for s in unsafe.steering)
    assert all(s.refusal_mass_after <= s.refusal_mass_before for s in safe.steering)
    assert all(s.refusal_mass_after == s.refusal_mass_before for s in none.steering)
    assert report.naive_forwards > report.fused_forwards > 0 and report.naive_s > 0 and report.fused_s > 0

    text = format_report(report)
    assert "RANDOMLY INITIALISED" in text and "noise" in text
    assert "All requests agree token for token" in text
    assert "x faster" in text and "naive loop" in text and "fused decoder" in text
    assert "3. What the steering did" in text and "->" in text


def test_demo_command(capsys):
    code = cli.main(
        ["demo", "--requests", "2", "--max-new-tokens", "4", "--steer-steps", "2", "--json", "--no-progress"]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["agree"] is True
    assert [r["verdict"] for r in report["requests"]] == ["unsafe", "safe"]
    assert all(len(r["steering"]) == 2 and r["naive_tokens"] == r["fused_tokens"] for r in report["requests"])
    assert report["settings"]["torch_threads"] == 1


def test_demo_rejects_bad_arguments(capsys):
    assert cli.main(["demo", "--requests", "9"]) == 2
    assert "--requests must be in [1, 6], got 9" in capsys.readouterr().err
    assert cli.main(["demo", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be >= 1" in capsys.readouterr().err


def test_the_report_explains_and_marks_every_steered_step():
    report = run_demo(
        num_requests=4, max_new_tokens=4, steer_steps=3, hidden_size=64, num_layers=2, image_size=56, progress=False
    )
    for r in report.requests:
        assert len(r.steps) == len(r.steering) == 3
        for record, view in zip(r.steering, r.steps, strict=True):
            assert view.token == record.token
            if r.verdict == "none" or view.refusal_in_set == 0:
                # No refusal token is biased: the mass and the choice stay.
                assert not view.changed and record.refusal_mass_after == pytest.approx(record.refusal_mass_before)
            if view.changed and r.verdict == "unsafe":
                assert view.refusal  # a boost can only put a refusal token first
            if view.changed and r.verdict == "safe":
                assert view.unbiased_refusal  # a penalty can only take a refusal token off the top
    text = format_report(report)
    # One line per number shown, and a mark for every steered step.
    for line in ("   z          the contrast", "   mass       probability softmax(z)", "   in top-20  refusal tokens"):
        assert line in text
    assert f"~{report.settings['refusal_tokens']}/{report.settings['vocab_size']} = " in text
    section = text[text.index("3. What the steering did") :].split("\n", 1)[1]
    rows = [line for line in section.splitlines() if line[:1].isdigit()]
    assert len(rows) == sum(len(r.steps) for r in report.requests)
    for line, view in zip(rows, [v for r in report.requests for v in r.steps]):
        assert line.endswith("-") != view.changed
        if view.changed:
            assert f"changed: {view.unbiased_text}" in line
    changed = sum(v.changed for r in report.requests for v in r.steps)
    assert f"The bias changed the chosen token at {changed} of 12 steered steps" in text
    assert all(c.isprintable() for line in text.splitlines() for c in line)  # no raw control characters
    saved = json.loads(json.dumps(report.to_dict()))
    step = saved["requests"][0]["steering"][0]
    assert {"token_without_bias", "bias_changed_token", "refusal_tokens_in_sensitive_set"} <= set(step)


class _Tokenizer:
    def decode(self, ids):
        return {3: "\x1b[31mI", 7: "ok\n"}.get(ids[0], f"t{ids[0]}")


def test_step_views_against_a_hand_computed_contrast():
    """``step_views`` on logits where the answer is known: at step 0 the refusal token 3 is second
    by 0.5 in z, so the unsafe boost of 1 puts it first; at step 1 it is 5 behind and stays."""
    from types import SimpleNamespace

    from safecode_kernels import RefusalVocabulary, SteeringParams
    from safecode_kernels.app.demo import step_views
    from safecode_kernels.decoding.results import SteeringRecord

    real = torch.zeros(2, 10)
    noised = torch.zeros(2, 10)
    real[0, 7], real[0, 3] = 2.0, 1.5  # z = real - 0.3 * 0: token 7 first, refusal token 3 second
    real[1, 7], real[1, 3] = 6.0, 1.0
    noised[1, 5] = -20.0  # z[1, 5] = 6.0: ties token 7, the lower id (5) wins
    result = SimpleNamespace(
        steering=[[SteeringRecord(0, 3, 0.0, 0.0), SteeringRecord(1, 5, 0.0, 0.0)]],
        logits=[real],
        noised_logits=[noised],
    )
    params = SteeringParams(sensitive_top_k=2)
    views = step_views(result, 0, "unsafe", RefusalVocabulary([3]), params, _Tokenizer())
    assert [(v.token, v.unbiased_token, v.refusal_in_set, v.changed) for v in views] == [
        (3, 7, 1, True),
        (5, 5, 0, False),  # top-2 of z is {5, 7}: the refusal token is outside the set
    ]
    assert views[0].token_text == repr("\x1b[31mI") == "'\\x1b[31mI'" and views[0].refusal
    assert views[0].unbiased_text == "'ok\\n'" and not views[0].unbiased_refusal


def test_token_text_escapes_and_names_byte_fragments():
    class Tokenizer:
        def decode(self, ids):
            return {1: "\x07bell", 2: "\ufffd"}[ids[0]]

        def convert_ids_to_tokens(self, token):
            return "Ä"

    assert token_text(Tokenizer(), 1) == "'\\x07bell'"
    assert token_text(Tokenizer(), 2) == "<bytes Ä>"


def test_no_steered_step_is_said_plainly(capsys):
    assert cli.main(["demo", "--requests", "2", "--max-new-tokens", "3", "--steer-steps", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "No step was steered (--steer-steps 0)" in out and "0 of 0" not in out
