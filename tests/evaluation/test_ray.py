"""``safecode-kernels eval --ray`` (:mod:`safecode_kernels.evaluation.ray_run`) on CPU: a saved tiny
LLaVA, a JSONL data set of 10 samples, one local Ray session of 2 CPUs for the module.

- The lines of a Ray run with two workers equal those of the single-process run (all but
  ``seconds`` and ``worker``), written by at least two worker processes, none of them the driver;
  ``score`` reads them unchanged.
- A worker killed (SIGKILL) in the middle of the run is restarted and its batch done again: every
  id exactly once.
- A Ray run stopped by Ctrl-C resumes with ``--ray`` and without; a driver killed by SIGKILL (the
  command's own local Ray start) loses at most the batches in flight.
- ``--ray ray://HOST:PORT``: a driver outside a cluster (started here with ``ray start``), through
  Ray Client.
- The worker actor itself, without Ray: hub samples, errors sent to the driver with their type;
  a folder with nothing left to do starts no Ray.

Skipped as a whole without the ``ray`` extra (``pip install -e ".[ray]"``).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason='the Ray tests need the ray extra: pip install -e ".[ray]"')
pytest.importorskip("ray.data", reason='the Ray tests need Ray Data: pip install -e ".[ray]"')

from safecode_kernels.app import cli  # noqa: E402
from safecode_kernels.app.cli import CLIError  # noqa: E402
from safecode_kernels.app.eval_cli import RayWorkerModel  # noqa: E402
from safecode_kernels.evaluation import store  # noqa: E402
from safecode_kernels.evaluation.loaders import load_benchmark  # noqa: E402
from safecode_kernels.evaluation.ray_run import GenerateBatches, _unpack_error, run_eval_ray  # noqa: E402
from safecode_kernels.evaluation.run import _check_arguments, run_eval  # noqa: E402
from safecode_kernels.evaluation.run_config import differences, read_config  # noqa: E402
from safecode_kernels.judges import JudgeHTTPError  # noqa: E402
from safecode_kernels.testing.tiny import tiny_llava  # noqa: E402
from tests.evaluation.killed_run import kill_after_first_batch  # noqa: E402
from tests.evaluation.layouts import make_jsonl  # noqa: E402
from tests.judges.chat_server import ChatServer, keyword_judge  # noqa: E402

# Ray Data's own DataContext warns about its deprecated fields whenever it copies a context.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

N = 10
FAST = ["--steer-steps", "3", "--max-new-tokens", "5", "--no-progress", "--batch-size", "2"]
RAY = ["--ray", "--workers", "2"]


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray session for the module: 2 CPUs (one per worker), a small object store."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            address="local",  # a new instance, even where a cluster of `ray start` runs on this machine
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=200 * 1024 * 1024,
            logging_level="WARNING",
        )
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny LLaVA saved with save_pretrained and a JSONL data set of N samples."""
    root = tmp_path_factory.mktemp("ray")
    model, processor = tiny_llava()
    model.save_pretrained(root / "llava")
    processor.save_pretrained(root / "llava")
    make_jsonl(root / "data", n=N)
    return root


@pytest.fixture
def one_thread(single_torch_thread):
    """The driver's runs on one torch thread, as each Ray worker (Ray sets OMP_NUM_THREADS=1)."""


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def eval_argv(saved, out, *extra):
    return [
        "eval",
        "--model",
        saved / "llava",
        "--benchmark",
        "jsonl",
        "--data",
        saved / "data" / "samples.jsonl",
        "--out",
        out,
        "--verdict",
        "unsafe",
        *FAST,
        *extra,
    ]


def lines_of(folder):
    return store.read_lines(folder / "generations.jsonl")


def by_id(lines) -> dict:
    """Each line by id, without what differs between runs (``seconds``, ``worker``); each id once."""
    ids = [line["id"] for line in lines]
    assert len(ids) == len(set(ids)), f"ids written twice: {sorted(i for i in set(ids) if ids.count(i) > 1)}"
    return {line["id"]: {k: v for k, v in line.items() if k not in ("seconds", "worker")} for line in lines}


@pytest.fixture(scope="module")
def reference(saved, tmp_path_factory):
    """The single-process run (no --ray) of the module's samples, by id."""
    import torch

    out = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main([str(a) for a in eval_argv(saved, out)]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = by_id(lines_of(out))
    assert len(lines) == N and all(line["error"] is None for line in lines.values())
    return out, lines


def test_ray_run_equals_the_single_process_run(ray_session, one_thread, capsys, saved, reference, tmp_path):
    ref_dir, ref = reference
    code, out, err = run(capsys, *eval_argv(saved, tmp_path / "ray", *RAY))
    assert code == 0, err
    assert f"{N} of {N} samples ({N} new by 2 Ray workers); next: safecode-kernels score" in out
    lines = lines_of(tmp_path / "ray")
    assert by_id(lines) == ref
    workers = {(line["worker"]["node"], line["worker"]["pid"]) for line in lines}
    assert len(workers) >= 2 and os.getpid() not in {pid for _, pid in workers}
    assert all(isinstance(line["worker"]["host"], str) and line["seconds"] > 0 for line in lines)
    # The same configuration as the single-process run: either may resume the other.
    assert differences(read_config(ref_dir), read_config(tmp_path / "ray")) == {}
    code, out, err = run(capsys, *eval_argv(saved, tmp_path / "ray", *RAY))
    assert code == 0 and f"all {N} samples are done" in out
    # score and report read the Ray run's folder unchanged.
    assert run(capsys, "score", tmp_path / "ray", "--scorer", "refusal-strings", "--no-progress")[0] == 0
    assert json.loads((tmp_path / "ray" / "report.json").read_text())["n"] == N
    code, out, err = run(capsys, "report", tmp_path / "ray")
    assert code == 0 and "| refusal_rate |" in out


def slow_judge(body):
    time.sleep(0.3)  # the worker is in the middle of its batch while the test kills it
    return keyword_judge(body)


def test_a_worker_killed_mid_run_is_restarted_and_its_batch_redone(
    ray_session, one_thread, capsys, saved, tmp_path, monkeypatch
):
    server = ChatServer(default=slow_judge).start()
    judge = [
        "--verdict",
        "auto",
        "--judge",
        "openai",
        "--judge-url",
        server.base_url,
        "--judge-model",
        "judge",
        "--judge-retries",
        "0",
        "--batch-size",
        "1",
    ]
    real, killed = store.append, []

    def append(path, records):  # once the first batch is saved: kill the worker that wrote it
        real(path, records)
        if not killed and records[0].get("worker"):
            killed.append(records[0]["worker"]["pid"])
            os.kill(killed[0], signal.SIGKILL)

    try:
        code, out, err = run(capsys, *eval_argv(saved, tmp_path / "local", *judge))
        assert code == 0, err
        monkeypatch.setattr(store, "append", append)
        code, out, err = run(capsys, *eval_argv(saved, tmp_path / "ray", *judge, *RAY))
    finally:
        server.stop()
    assert code == 0, err
    assert killed, "no worker was killed"
    lines = lines_of(tmp_path / "ray")
    assert by_id(lines) == by_id(lines_of(tmp_path / "local"))  # every id exactly once, the same answers
    assert all(line["error"] is None and line["verdict"] == "safe" for line in lines)
    # The batch the killed worker was on is done by its restarted process (a new pid) or, with
    # older Ray Data, by the other worker: either way once.
    assert killed[0] in {line["worker"]["pid"] for line in lines}


def test_an_interrupted_ray_run_resumes_with_and_without_ray(
    ray_session, one_thread, capsys, saved, reference, tmp_path, monkeypatch
):
    _, ref = reference
    real = store.append

    def append(path, records):
        real(path, records)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as soon as a batch is saved

    monkeypatch.setattr(store, "append", append)
    code, out, err = run(capsys, *eval_argv(saved, tmp_path / "with", *RAY))
    monkeypatch.undo()
    assert code == 130, err
    assert "rerun the same command to resume" in err
    first = lines_of(tmp_path / "with")
    assert len(first) == 2  # the batch written when Ctrl-C came; the ones in flight are dropped
    shutil.copytree(tmp_path / "with", tmp_path / "without")

    code, out, err = run(capsys, *eval_argv(saved, tmp_path / "with", *RAY))
    assert code == 0, err
    assert f"{N} of {N} samples ({N - 2} new by" in out
    code, out, err = run(capsys, *eval_argv(saved, tmp_path / "without"))
    assert code == 0, err
    for folder in ("with", "without"):
        lines = lines_of(tmp_path / folder)
        assert lines[:2] == first and by_id(lines) == ref
    assert all("worker" not in line for line in lines_of(tmp_path / "without")[2:])


def test_a_killed_driver_loses_at_most_the_batches_in_flight(
    ray_session, one_thread, capsys, saved, reference, tmp_path
):
    """The command's own local Ray start, in a child process killed once a batch is saved."""
    _, ref = reference
    argv = eval_argv(saved, tmp_path / "killed", *RAY)
    pid = kill_after_first_batch(argv, tmp_path / "killed", tmp_path, timeout=240)
    first = lines_of(tmp_path / "killed")
    assert len(first) == 2 and first[0]["worker"]["pid"] != pid

    code, out, err = run(capsys, *eval_argv(saved, tmp_path / "killed"))  # resumed without Ray
    assert code == 0, err
    lines = lines_of(tmp_path / "killed")
    assert lines[:2] == first and by_id(lines) == ref


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_driver_outside_the_cluster_through_ray_client(saved, reference, tmp_path):
    """Ray Data does not run through Ray Client: the data set runs in an actor on the cluster,
    and the driver here gets each batch's lines and writes them."""
    pytest.importorskip("grpc", reason='ray:// needs Ray Client (grpcio): pip install -e ".[ray]"')
    _, ref = reference
    port, client_port = free_port(), free_port()
    env = {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
        "RAY_AUTH_MODE": "disabled",  # else recent Ray asks Ray Client for the cluster's token
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }  # stop at SIGTERM, without waiting 30 s to drain
    # Its own temporary folder (short: it holds Unix sockets), so that the address `ray start`
    # records there for later `ray.init()` calls on this machine goes away with it.
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    head = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--ray-client-server-port={client_port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--object-store-memory=100000000",
            f"--temp-dir={temp}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, head.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the Ray head did not start"
            try:
                socket.create_connection(("127.0.0.1", client_port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        argv = eval_argv(saved, tmp_path / "client", "--ray", f"ray://127.0.0.1:{client_port}", "--workers", "2")
        proc = subprocess.run(
            [sys.executable, "-m", "safecode_kernels", *map(str, argv)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        head.terminate()  # `ray start --block` stops the cluster's processes
        head.communicate(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{N} of {N} samples ({N} new by 2 Ray workers)" in proc.stdout
    lines = lines_of(tmp_path / "client")
    assert by_id(lines) == ref
    assert len({line["worker"]["pid"] for line in lines}) >= 2


# ----- the worker actor, called here without Ray ------------------------------------------------
def settings(samples, verdict="unsafe"):
    return _check_arguments(samples, "safecode", "paper", verdict, 2, 5, 0, 3, 16, None)


def call(actor, samples):
    """The actor on one batch of ``samples``: ``(lines, fatal bytes)``."""
    out = actor({"samples": np.array([json.dumps([s.to_dict() for s in samples])], dtype=object)})
    return json.loads(out["records"][0]), out["fatal"][0]


def test_the_worker_reads_hub_images_through_reopen(one_thread, saved, tmp_path):
    pytest.importorskip("datasets", reason='HADES needs datasets: pip install -e ".[eval]"')
    from tests.evaluation.layouts import make_hades

    data = make_hades(tmp_path / "hades", n=3)
    samples = load_benchmark("hades", data)
    load = RayWorkerModel(str(saved / "llava"), "auto", "cpu")
    with pytest.raises(ValueError, match="give reopen"):
        run_eval_ray(load, samples, tmp_path / "run", verdict="unsafe")
    actor = GenerateBatches(load, settings(samples), 0.1, reopen=functools.partial(load_benchmark, "hades", data))
    lines, fatal = call(actor, samples)
    assert not fatal and [line["id"] for line in lines] == [s.id for s in samples]
    assert all(line["error"] is None and line["worker"]["pid"] == os.getpid() for line in lines)
    run_eval(
        *load()[:2],
        samples,
        tmp_path / "local",
        verdict="unsafe",
        batch_size=2,
        max_new_tokens=5,
        steer_steps=3,
        progress=False,
    )
    assert by_id(lines) == by_id(lines_of(tmp_path / "local"))


def test_a_finished_folder_starts_no_ray(one_thread, saved, tmp_path, monkeypatch):
    samples = load_benchmark("jsonl", saved / "data" / "samples.jsonl", limit=2)
    load = RayWorkerModel(str(saved / "llava"), "auto", "cpu")
    run_eval(*load()[:2], samples, tmp_path / "run", verdict="unsafe", max_new_tokens=5, steer_steps=3, progress=False)
    monkeypatch.setattr(ray, "init", None)  # any start of Ray would fail
    summary = run_eval_ray(
        load, samples, tmp_path / "run", verdict="unsafe", max_new_tokens=5, steer_steps=3, progress=False
    )
    assert (summary["already_done"], summary["written"], summary["remaining"], summary["workers"]) == (2, 0, 0, 0)


class DownJudge:
    def judge(self, images, prompts):
        raise JudgeHTTPError("the judge answered 503", 503)


def test_the_worker_sends_what_stops_the_run_with_its_type(one_thread, saved):
    samples = load_benchmark("jsonl", saved / "data" / "samples.jsonl", limit=2)
    load = RayWorkerModel(str(saved / "llava"), "auto", "cpu")

    def with_down_judge():
        return (*load()[:2], DownJudge())

    lines, fatal = call(GenerateBatches(with_down_judge, settings(samples, "auto"), 0.1), samples)
    err = _unpack_error(fatal)
    assert lines == [] and type(err) is JudgeHTTPError and err.status == 503
    assert any(note.startswith("on Ray worker ") for note in err.__notes__)

    def broken():
        raise CLIError("cannot load /models/x: no weights", code=1)

    lines, fatal = call(GenerateBatches(broken, settings(samples), 0.1), samples)
    err = _unpack_error(fatal)
    assert type(err) is CLIError and err.code == 1 and str(err) == "cannot load /models/x: no weights"
