"""``safecode-kernels demo``: both decoders agree and the report says what it shows."""

from __future__ import annotations

import json

import torch

from safecode_kernels.app import cli
from safecode_kernels.app.demo import format_report, run_demo


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
    assert "step 2" in text and "->" in text


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
