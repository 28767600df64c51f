"""Run ``safecode-kernels eval`` in a child process and SIGKILL it once its first batch is saved."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# Installed into the child process with PYTHONPATH: after each batch is appended, wait until the
# file named by SAFECODE_TEST_RELEASE exists, so the test can kill it at a known point.
STALL = """
import os, time
import safecode_kernels.evaluation.store as store

_append = store.append

def append(path, records):
    _append(path, records)
    release = os.environ["SAFECODE_TEST_RELEASE"]
    for _ in range(3000):
        if os.path.exists(release):
            return
        time.sleep(0.02)

store.append = append
"""


def kill_after_first_batch(argv, out_dir: Path, tmp_path: Path, timeout: float, lines: int = 2) -> int:
    """Start ``python -m safecode_kernels *argv``, wait until ``out_dir/generations.jsonl`` holds
    ``lines`` lines, SIGKILL the child and return its pid."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(STALL)
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path / "hook"),
        "SAFECODE_TEST_RELEASE": str(tmp_path / "never"),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "safecode_kernels", *map(str, argv)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    path = out_dir / "generations.jsonl"
    try:
        deadline = time.monotonic() + timeout
        while not (path.exists() and path.read_bytes().count(b"\n") >= lines):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no batch was written"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    return proc.pid
