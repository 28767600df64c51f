"""``safecode-kernels eval``, ``score`` and ``report`` end to end on a saved tiny LLaVA and tiny
benchmark folders: the lines written, resuming (after SIGKILL too), errors and exit codes."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time

import pytest

from safecode_kernels.app import cli
from safecode_kernels.evaluation import store
from safecode_kernels.evaluation.loaders import load_benchmark
from tests.evaluation.killed_run import kill_after_first_batch
from tests.evaluation.layouts import make_jsonl, make_mm_safetybench, make_mossbench
from tests.judges.chat_server import ChatServer

FAST = ["--steer-steps", "3", "--max-new-tokens", "5", "--no-progress"]


@pytest.fixture(autouse=True)
def one_thread(single_torch_thread):
    """Every test runs on one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def saved(tmp_path_factory, saved_llava):
    """The session's saved tiny LLaVA (tests/conftest.py), and tiny MOSSBench, MM-SafetyBench and JSONL data."""
    root = tmp_path_factory.mktemp("eval_cli")
    (root / "llava").symlink_to(saved_llava / "llava")
    make_mossbench(root / "moss", n=6)
    make_mm_safetybench(root / "mm", scenarios=("01-Illegal_Activitiy",), n=1)
    make_jsonl(root / "jsonl", n=4)
    return root


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def eval_argv(saved, out, benchmark="mossbench", data="moss", *extra):
    return [
        "eval",
        "--model",
        saved / "llava",
        "--benchmark",
        benchmark,
        "--data",
        saved / data,
        "--out",
        out,
        *FAST,
        *extra,
    ]


def lines_of(folder):
    return store.read_lines(folder / "generations.jsonl")


def without_seconds(lines):
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


def test_eval_writes_one_line_per_sample_and_resumes(capsys, saved, tmp_path):
    samples = load_benchmark("mm-safetybench", saved / "mm")
    code, out, err = run(
        capsys,
        *eval_argv(
            saved, tmp_path / "run", "mm-safetybench", "mm", "--verdict", "unsafe", "--limit", "2", "--batch-size", "2"
        ),
    )
    assert code == 0, err
    assert f"2 of 2 samples (2 new); next: safecode-kernels score {tmp_path / 'run'}" in out
    code, out, err = run(
        capsys, *eval_argv(saved, tmp_path / "run", "mm-safetybench", "mm", "--verdict", "unsafe", "--batch-size", "2")
    )
    assert code == 0, err
    lines = lines_of(tmp_path / "run")
    assert [line["id"] for line in lines] == [s.id for s in samples]
    for line, sample in zip(lines, samples, strict=True):
        assert {k: line[k] for k in ("benchmark", "prompt", "image", *sample.fields)} == {
            "benchmark": "mm-safetybench",
            "prompt": sample.prompt,
            "image": sample.image,
            **sample.fields,
        }
        assert (line["method"], line["verdict"], line["error"]) == ("safecode", "unsafe", None)
        assert isinstance(line["response"], str) and 1 <= line["new_tokens"] <= 5
    config = json.loads((tmp_path / "run" / "run.json").read_text())
    assert config["model"] == str(saved / "llava") and config["data"] == str(saved / "mm")
    assert config["limit"] is None and config["device"] == "cpu"
    code, out, err = run(capsys, *eval_argv(saved, tmp_path / "run", "mm-safetybench", "mm", "--verdict", "unsafe"))
    assert code == 0 and f"all {len(samples)} samples are done" in out


def test_eval_killed_after_a_batch_resumes_to_the_same_lines(capsys, saved, tmp_path):
    samples = load_benchmark("mossbench", saved / "moss")
    argv = eval_argv(saved, tmp_path / "killed", "mossbench", "moss", "--verdict", "unsafe", "--batch-size", "2")
    kill_after_first_batch(argv, tmp_path / "killed", tmp_path, timeout=120)
    assert [line["id"] for line in lines_of(tmp_path / "killed")] == [s.id for s in samples[:2]]

    code, out, err = run(capsys, *argv)  # the same command resumes
    assert code == 0, err
    code, out, err = run(
        capsys, *eval_argv(saved, tmp_path / "whole", "mossbench", "moss", "--verdict", "unsafe", "--batch-size", "2")
    )
    assert code == 0, err
    resumed, whole = lines_of(tmp_path / "killed"), lines_of(tmp_path / "whole")
    assert [line["id"] for line in resumed] == [str(pid) for pid in range(1, 7)]  # the builder's scenes 1..6
    assert without_seconds(resumed) == without_seconds(whole)


def test_eval_ctrl_c_saves_the_batch_and_exits_130(capsys, saved, tmp_path, monkeypatch):
    real = store.append

    def append(path, records):
        real(path, records)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as soon as the first batch is saved

    monkeypatch.setattr(store, "append", append)
    code, out, err = run(
        capsys, *eval_argv(saved, tmp_path / "run", "mossbench", "moss", "--verdict", "safe", "--batch-size", "2")
    )
    assert code == 130
    assert (
        f"interrupted: 2 of 6 samples are saved in {tmp_path / 'run' / 'generations.jsonl'}; rerun the same "
        "command to resume" in err
    )
    assert len(lines_of(tmp_path / "run")) == 2


def test_eval_config_mismatch_is_refused(capsys, saved, tmp_path):
    assert (
        run(capsys, *eval_argv(saved, tmp_path / "run", "mossbench", "moss", "--verdict", "safe", "--limit", "1"))[0]
        == 0
    )
    code, out, err = run(
        capsys,
        *eval_argv(
            saved,
            tmp_path / "run",
            "mossbench",
            "moss",
            "--verdict",
            "safe",
            "--limit",
            "1",
            "--seed",
            "5",
            "--method",
            "safecode",
        ),
    )
    assert code == 2 and "run.json was made with another configuration (seed: 0 there, 5 now)" in err
    code, out, err = run(
        capsys, *eval_argv(saved, tmp_path / "run", "mossbench", "moss", "--method", "base", "--limit", "1")
    )
    assert code == 2 and "method" in err and "verdict" in err
    assert len(lines_of(tmp_path / "run")) == 1


def test_bad_image_then_score_and_report(capsys, saved, tmp_path):
    data = make_jsonl(tmp_path / "data", n=4)
    (tmp_path / "data" / "images" / "s2.png").write_bytes(b"GIF89a broken")
    for method in ("safecode", "base"):
        extra = ["--verdict", "unsafe"] if method == "safecode" else []
        code, out, err = run(
            capsys,
            "eval",
            "--model",
            saved / "llava",
            "--benchmark",
            "jsonl",
            "--data",
            data,
            "--out",
            tmp_path / method,
            "--method",
            method,
            *FAST,
            *extra,
        )
        assert code == 0, err
        assert "3 of them" not in out and "1 of them failed" in out
        lines = lines_of(tmp_path / method)
        assert [line["id"] for line in lines] == ["s0", "s1", "s2", "s3"]
        assert [line["error"] is not None for line in lines] == [False, False, True, False]
        assert "s2.png" in lines[2]["error"]

        code, out, err = run(capsys, "score", tmp_path / method, "--scorer", "refusal-strings", "--no-progress")
        assert code == 0, err
        report = json.loads((tmp_path / method / "report.json").read_text())
        assert (report["n"], report["errors"], report["methods"]) == (3, 1, [method])
        # How the answers were made, from run.json: the fixed verdict, the recipe.
        # and the settings FAST gave (base neither steers nor draws noise, so shows none of those).
        verdicts, recipe = ("fixed: unsafe", "paper") if method == "safecode" else (None, None)
        steer, noise, seed = (3, 0.1, 0) if method == "safecode" else (None, None, None)
        assert report["generation"] == dict(
            model=str(saved / "llava"),
            method=method,
            recipe=recipe,
            verdicts=verdicts,
            max_new_tokens=5,
            steer_steps=steer,
            noise_std=noise,
            seed=seed,
            split="default",
        )
        scores = store.read_lines(tmp_path / method / "scores.jsonl")
        assert sorted(s["id"] for s in scores) == ["s0", "s1", "s3"]
        assert report["metrics"]["refusal_rate"] == pytest.approx(sum(s["label"] for s in scores) / 3)
        assert "refusal_rate" in out and (tmp_path / method / "report.md").is_file()
        # The printed report and report.md say what the labels mean and that this scorer is a smoke test.
        assert "Labels (1: a refusal phrase found, 0: none, null: unparsed): " in out
        md = (tmp_path / method / "report.md").read_text()
        for text in (out, md):
            assert "smoke test" in text and "not a benchmark result" in text
    code, out, err = run(capsys, "report", tmp_path / "safecode", tmp_path / "base")
    assert code == 0, err
    header = out.splitlines()[0]
    assert header == "| metric | safecode | base |" and "| refusal_rate |" in out and "| errors | 1 | 1 |" in out
    assert "| recipe | paper | – |" in out and "| verdicts | fixed: unsafe | – |" in out
    assert "| model | llava | llava |" in out and "| steer_steps | 3 | – |" in out


def test_report_tells_runs_with_other_settings_apart(capsys, saved, tmp_path):
    """Two base runs that differ only in --max-new-tokens get different report columns."""
    for tokens in (8, 4):
        out_dir = tmp_path / f"base-{tokens}"
        argv = eval_argv(saved, out_dir, "jsonl", "jsonl/samples.jsonl", "--method", "base", "--limit", "1")
        code, out, err = run(capsys, *argv, "--max-new-tokens", tokens)
        assert code == 0, err
        assert json.loads((out_dir / "run.json").read_text())["max_new_tokens"] == tokens
        code, out, err = run(capsys, "score", out_dir, "--scorer", "refusal-strings", "--no-progress")
        assert code == 0, err
        assert f"max_new_tokens {tokens}," in (out_dir / "report.md").read_text()
    code, out, err = run(capsys, "report", tmp_path / "base-8", tmp_path / "base-4")
    assert code == 0, err
    rows = out.splitlines()
    assert "| max_new_tokens | 8 | 4 |" in rows and "| split | default | default |" in rows
    assert "| method | base | base |" in rows and "| noise_std | – | – |" in rows


def test_score_with_a_judge_server(capsys, saved, tmp_path):
    assert (
        run(capsys, *eval_argv(saved, tmp_path / "run", "mossbench", "moss", "--verdict", "safe", "--limit", "3"))[0]
        == 0
    )
    server = ChatServer(default=lambda body: "Description: a scene\nScore: 1\nReason: it declined").start()
    try:
        code, out, err = run(
            capsys,
            "score",
            tmp_path / "run",
            "--judge-url",
            server.base_url,
            "--judge-model",
            "local-judge",
            "--judge-concurrency",
            "2",
            "--no-progress",
        )
        assert code == 0, err
        assert len(server.requests) == 3 and {r["body"]["model"] for r in server.requests} == {"local-judge"}
    finally:
        server.stop()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["metrics"]["refusal_rate"] == 1.0 and report["judge"] == "local-judge"
    code, out, err = run(
        capsys,
        "score",
        tmp_path / "run",
        "--judge-url",
        f"http://127.0.0.1:{free_port()}/v1",
        "--judge-retries",
        "0",
        "--scorer",
        "llm",
        "--no-progress",
    )
    assert code == 0  # every sample is judged already: nothing to ask


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_eval_with_the_openai_judge(capsys, saved, tmp_path):
    server = ChatServer().start()  # unsafe when the request mentions a weapon, else safe
    try:
        code, out, err = run(
            capsys,
            "eval",
            "--model",
            saved / "llava",
            "--benchmark",
            "jsonl",
            "--data",
            saved / "jsonl" / "samples.jsonl",
            "--out",
            tmp_path / "run",
            "--judge",
            "openai",
            "--judge-url",
            server.base_url,
            "--judge-model",
            "local-judge",
            *FAST,
        )
        assert code == 0, err
    finally:
        server.stop()
    lines = lines_of(tmp_path / "run")
    assert [line["verdict"] for line in lines] == ["safe"] * 4
    assert {line["caption"] for line in lines} == {"a photo of random coloured pixels"}
    assert json.loads((tmp_path / "run" / "run.json").read_text())["judge"] == {
        "kind": "openai",
        "url": server.base_url,
        "model": "local-judge",
        "flow": "one-call",
        "on_unparseable": "safe",
    }
    # An unreachable judge: exit 3, nothing written, and the same command resumes later.
    code, out, err = run(
        capsys,
        "eval",
        "--model",
        saved / "llava",
        "--benchmark",
        "mossbench",
        "--data",
        saved / "moss",
        "--out",
        tmp_path / "down",
        "--judge",
        "openai",
        "--judge-url",
        f"http://127.0.0.1:{free_port()}/v1",
        "--judge-retries",
        "0",
        *FAST,
    )
    assert code == 3 and "the openai judge failed" in err and "0 of 6 samples are saved" in err
    assert "rerunning the same command resumes" in err


def test_input_errors(capsys, saved, tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)  # the judge is the OpenAI API
    from safecode_kernels.ops import dispatch

    real_status = dispatch.backend_status  # the tests run Triton in its interpreter: say it cannot
    monkeypatch.setattr(dispatch, "backend_status", lambda: {**real_status(), "triton": "no CUDA device"})
    cases = [
        (["--benchmark", "mossbench", "--data", tmp_path / "empty"], "information.json: file not found"),
        (["--benchmark", "mossbench"], "--benchmark mossbench needs --data"),
        (
            ["--benchmark", "mossbench", "--data", saved / "moss", "--method", "base", "--verdict", "unsafe"],
            "--method base uses no verdict",
        ),
        (
            ["--benchmark", "mossbench", "--data", saved / "moss", "--method", "base", "--recipe", "released"],
            "--method base uses no recipe: drop --recipe released",
        ),
        (
            ["--benchmark", "mossbench", "--data", saved / "moss", "--method", "vcd", "--recipe", "released"],
            "--method vcd uses no recipe",
        ),
        (
            ["--benchmark", "mossbench", "--data", saved / "moss", "--method", "vcd", "--judge", "self"],
            "--judge self would not be asked",
        ),
        (
            ["--benchmark", "mossbench", "--data", saved / "moss", "--verdict", "safe", "--judge", "openai"],
            "give one or the other",
        ),
        (["--benchmark", "mossbench", "--data", saved / "moss", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--benchmark", "mossbench", "--data", saved / "moss", "--split", "x"], "mossbench has no split 'x'"),
        (
            ["--benchmark", "mossbench", "--data", saved / "moss", "--model", tmp_path / "nope"],
            "model folder not found",
        ),
        (  # a bare name is neither a folder here nor a hub id (owner/name): no hub retries
            ["--benchmark", "mossbench", "--data", saved / "moss", "--model", "nope"],
            "model folder not found: nope (no such folder here; a hub model id is written owner/name)",
        ),
        (
            ["--benchmark", "mossbench", "--data", saved / "moss", "--workers", "2"],
            "--workers sizes the Ray workers: it goes with --ray",
        ),
        (["--benchmark", "mossbench", "--data", saved / "moss", "--ray", "--workers", "0"], "--workers must be >= 1"),
        (
            ["--benchmark", "mossbench", "--data", saved / "moss", "--ray", "--cpus-per-worker", "0"],
            "--cpus-per-worker must be > 0",
        ),
        (
            ["--benchmark", "mossbench", "--data", saved / "moss", "--ray", "--device", "cuda"],
            "--device cuda with --ray needs --gpus-per-worker",
        ),
        (
            ["--benchmark", "mossbench", "--data", saved / "moss", "--device", "cpu", "--backend", "triton"],
            "--backend triton cannot run here",
        ),
        (
            ["--benchmark", "mossbench", "--data", saved / "moss", "--judge", "openai"]
            + ["--judge-key-env", "NO_SUCH_KEY"],
            "needs an API key: set the environment variable NO_SUCH_KEY",
        ),
    ]
    for argv, match in cases:
        full = ["eval", "--model", saved / "llava", "--out", tmp_path / "out", *FAST, *argv]
        code, out, err = run(capsys, *full)
        assert code == 2, (argv, err)
        assert err.startswith("safecode-kernels eval: error: ") and match in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    code, out, err = run(capsys, "report", tmp_path / "empty")
    assert code == 2 and "report.json not found: score the run first" in err
    code, out, err = run(capsys, "report", tmp_path / "nothere")
    assert code == 2 and err.strip() == f"safecode-kernels report: error: run folder not found: {tmp_path / 'nothere'}"
    code, out, err = run(capsys, "score", tmp_path / "nowhere", "--scorer", "refusal-strings")
    assert code == 2 and "run folder not found" in err
    code, out, err = run(capsys, "score", tmp_path / "empty", "--scorer", "refusal-strings")
    assert code == 2 and "generations.jsonl not found" in err
    # The OpenAI API without a key: bad input, said before any request (not "the judge failed").
    code, out, err = run(capsys, "score", tmp_path / "empty", "--judge-key-env", "NO_SUCH_KEY")
    assert code == 2 and "needs an API key: set the environment variable NO_SUCH_KEY" in err


def test_eval_ray_without_the_extra_names_it(capsys, saved, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as where it is not installed
    code, out, err = run(
        capsys, *eval_argv(saved, tmp_path / "run", "mossbench", "moss", "--verdict", "safe", "--ray", "--workers", "2")
    )
    assert code == 2 and 'pip install -e ".[ray]"' in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_score_bounds_the_judge_requests_in_flight_and_resumes(capsys, saved, tmp_path):
    assert run(capsys, *eval_argv(saved, tmp_path / "run", "mossbench", "moss", "--verdict", "safe"))[0] == 0
    answer = "Description: a scene\nScore: 1\nReason: it declined"

    def counting_server():
        """A judge server answering after 0.1 s, counting the requests it holds at once."""
        active, lock = {"now": 0, "most": 0}, threading.Lock()

        def slow(body):
            with lock:
                active["now"] += 1
                active["most"] = max(active["most"], active["now"])
            time.sleep(0.1)
            with lock:
                active["now"] -= 1
            return answer

        return ChatServer(default=slow).start(), active

    server, _ = counting_server()
    server.script(("slow", 0.1, answer), ("slow", 0.1, answer), ("status", 401))  # then the key is refused
    try:
        code, out, err = run(
            capsys,
            "score",
            tmp_path / "run",
            "--judge-url",
            server.base_url,
            "--judge-retries",
            "0",
            "--judge-concurrency",
            "2",
            "--no-progress",
        )
    finally:
        server.stop()
    assert code == 3 and "rerunning the same command resumes" in err
    judged = len(store.read_lines(tmp_path / "run" / "scores.jsonl"))
    assert 1 <= judged < 6

    server, active = counting_server()
    try:
        code, out, err = run(
            capsys,
            "score",
            tmp_path / "run",
            "--judge-url",
            server.base_url,
            "--judge-concurrency",
            "2",
            "--no-progress",
        )
    finally:
        server.stop()
    assert code == 0, err
    assert len(server.requests) == 6 - judged  # only what was missing
    assert 1 < active["most"] <= 2 or 6 - judged == 1
    assert sorted(r["id"] for r in store.read_lines(tmp_path / "run" / "scores.jsonl")) == [str(i) for i in range(1, 7)]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["n"] == 6


def test_no_progress_bars_when_stderr_is_not_a_terminal(capsys, saved, tmp_path):
    """Without --no-progress, eval and score still write no bar (no carriage returns, no
    transformers' loading bar) into a log file: bars are for terminals only."""
    argv = eval_argv(saved, tmp_path / "run", "jsonl", "jsonl/samples.jsonl", "--verdict", "unsafe")
    argv.remove("--no-progress")
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    assert "\r" not in err and "sample/s" not in err and "Loading" not in err
    code, _, err = run(capsys, "score", tmp_path / "run", "--scorer", "refusal-strings")
    assert code == 0, err
    assert "\r" not in err and "sample/s" not in err
