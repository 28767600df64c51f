"""Choosing the step op's backend: by device, per call, and by SAFECODE_BACKEND."""

from __future__ import annotations

import logging

import pytest
import torch

import safecode_kernels as sk
from safecode_kernels.ops import step_cpu, step_torch
from safecode_kernels.ops.dispatch import BACKENDS, backend_status, resolve_backend

CPU = torch.device("cpu")
requires_cpu = pytest.mark.skipif(backend_status()["cpu"] is not None, reason="cpu backend unavailable")


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch):
    monkeypatch.delenv("SAFECODE_BACKEND", raising=False)


def _inputs():
    real = torch.randn(2, 50)
    return real, real * 0.5, ["unsafe", "safe"], torch.tensor([1, 7])


def test_backend_status_shape():
    status = backend_status()
    assert set(status) == set(BACKENDS) == {"torch", "cpu", "triton"}
    assert status["torch"] is None
    for name, reason in status.items():
        assert reason is None or (isinstance(reason, str) and reason), name


@requires_cpu
def test_auto_picks_cpu_for_cpu_tensors():
    assert resolve_backend("auto", CPU) is step_cpu.step_cpu


def test_explicit_backends():
    assert resolve_backend("torch", CPU) is step_torch.step_torch
    if backend_status()["cpu"] is None:
        assert resolve_backend("cpu", CPU) is step_cpu.step_cpu


@pytest.mark.parametrize("value", ["torch", "TORCH", " torch\n"])
def test_env_overrides_auto(monkeypatch, value):
    monkeypatch.setenv("SAFECODE_BACKEND", value)
    assert resolve_backend("auto", CPU) is step_torch.step_torch


@requires_cpu
def test_env_does_not_override_an_explicit_backend(monkeypatch):
    monkeypatch.setenv("SAFECODE_BACKEND", "torch")
    assert resolve_backend("cpu", CPU) is step_cpu.step_cpu
    monkeypatch.setenv("SAFECODE_BACKEND", "cpu")
    assert resolve_backend("torch", CPU) is step_torch.step_torch


@requires_cpu
@pytest.mark.parametrize("value", ["", "auto", "  "])
def test_env_auto_or_empty_means_auto(monkeypatch, value):
    monkeypatch.setenv("SAFECODE_BACKEND", value)
    assert resolve_backend("auto", CPU) is step_cpu.step_cpu


def test_env_unknown_backend_raises(monkeypatch):
    monkeypatch.setenv("SAFECODE_BACKEND", "fortran")
    with pytest.raises(ValueError, match="unknown backend 'fortran'"):
        resolve_backend("auto", CPU)
    with pytest.raises(ValueError, match="unknown backend 'fortran'"):
        sk.safecode_step(*_inputs())


@pytest.mark.parametrize("name", ["cuda", "Torch", "gpu", "", "auto "])
def test_unknown_backend_raises(name):
    with pytest.raises(ValueError, match=f"unknown backend {name!r}"):
        resolve_backend(name, CPU)
    with pytest.raises(ValueError, match="unknown backend"):
        sk.safecode_step(*_inputs(), backend=name)


@pytest.mark.parametrize("name", [None, 1, ("cpu",)])
def test_non_string_backend_raises(name):
    with pytest.raises(TypeError, match="backend must be a str"):
        resolve_backend(name, CPU)


@requires_cpu
def test_cpu_backend_refuses_other_devices():
    with pytest.raises(ValueError, match="'cpu' backend needs CPU tensors"):
        resolve_backend("cpu", torch.device("meta"))


def test_auto_falls_back_to_torch_on_other_devices():
    assert resolve_backend("auto", torch.device("meta")) is step_torch.step_torch


def test_without_the_extension(monkeypatch):
    """When the C++ extension is not built: auto falls back to torch, the status says why,
    and asking for 'cpu' explicitly raises with that reason."""
    monkeypatch.setattr(step_cpu, "_C", None)
    monkeypatch.setattr(step_cpu, "_IMPORT_ERROR", "No module named 'safecode_kernels._C'", raising=False)
    reason = backend_status()["cpu"]
    assert isinstance(reason, str) and "not built" in reason
    assert resolve_backend("auto", CPU) is step_torch.step_torch
    with pytest.raises(RuntimeError, match="'cpu' backend is unavailable"):
        resolve_backend("cpu", CPU)
    out = sk.safecode_step(*_inputs())
    assert out.tokens.shape == (2,)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_triton_without_cuda_raises_clearly():
    with pytest.raises(RuntimeError, match="'triton' backend is unavailable"):
        resolve_backend("triton", torch.device("cuda"))


@requires_cpu
def test_auto_runs_the_cpu_kernel(monkeypatch):
    """End to end: auto on CPU tensors runs the C++ kernel; with the env override, torch."""
    calls = []
    real_cpu, real_torch = step_cpu.step_cpu, step_torch.step_torch
    monkeypatch.setattr(step_cpu, "step_cpu", lambda *a: calls.append("cpu") or real_cpu(*a))
    monkeypatch.setattr(step_torch, "step_torch", lambda *a: calls.append("torch") or real_torch(*a))
    inputs = _inputs()
    auto = sk.safecode_step(*inputs)
    monkeypatch.setenv("SAFECODE_BACKEND", "torch")
    forced = sk.safecode_step(*inputs)
    assert calls == ["cpu", "torch"]
    assert torch.equal(auto.tokens, forced.tokens)


@pytest.fixture
def fallback_log(monkeypatch, caplog):
    """Captures the 'safecode_kernels' logger, with no fallback logged yet in this process."""
    from safecode_kernels.ops import dispatch

    monkeypatch.setattr(dispatch, "_LOGGED_FALLBACKS", set())
    caplog.set_level(logging.INFO, logger="safecode_kernels")
    return lambda: [r for r in caplog.records if r.name == "safecode_kernels"]


def test_auto_fallback_without_the_extension_is_logged_once(monkeypatch, fallback_log):
    monkeypatch.setattr(step_cpu, "_C", None)
    monkeypatch.setattr(step_cpu, "_IMPORT_ERROR", "No module named 'safecode_kernels._C'", raising=False)
    for _ in range(3):
        assert resolve_backend("auto", CPU) is step_torch.step_torch
    sk.safecode_step(*_inputs())
    records = fallback_log()
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "'torch'" in message and "'cpu' backend is unavailable" in message and "not built" in message


def test_auto_fallback_on_cuda_without_triton_is_logged_once(monkeypatch, fallback_log):
    from safecode_kernels.ops import step_triton

    monkeypatch.setattr(
        step_triton, "unavailable_reason", lambda device=None: "triton is not installed (No module named 'triton')"
    )
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda) is step_torch.step_torch
    assert resolve_backend("auto", cuda) is step_torch.step_torch
    records = fallback_log()
    assert len(records) == 1
    assert "'triton' backend is unavailable: triton is not installed" in records[0].getMessage()
    assert "cuda tensors" in records[0].getMessage()


def test_no_log_when_nothing_falls_back(monkeypatch, fallback_log):
    resolve_backend("torch", CPU)  # asked for explicitly
    resolve_backend("auto", torch.device("meta"))  # torch is the only backend there
    monkeypatch.setenv("SAFECODE_BACKEND", "torch")
    resolve_backend("auto", CPU)
    if backend_status()["cpu"] is None:
        monkeypatch.delenv("SAFECODE_BACKEND")
        resolve_backend("auto", CPU)
    assert fallback_log() == []


class _BrokenTriton:
    """Stands in for the Triton step: every call raises ``error``."""

    def __init__(self, error: Exception):
        self.error, self.calls = error, 0

    def __call__(self, inputs, return_logits, return_stats):
        self.calls += 1
        raise self.error


@pytest.fixture
def fake_cuda(monkeypatch):
    """'auto' on a CUDA device whose Triton backend reports itself usable (no GPU needed: the
    step functions are stand-ins and the inputs carry only their device)."""
    from safecode_kernels.ops import dispatch, step_triton

    monkeypatch.setattr(step_triton, "unavailable_reason", lambda device=None: None)
    monkeypatch.setattr(dispatch, "_TRITON_RAN", set())
    monkeypatch.setattr(dispatch, "_TRITON_BROKEN", {})
    monkeypatch.setattr(dispatch, "_LOGGED_FALLBACKS", set())
    torch_calls = []
    monkeypatch.setattr(step_torch, "step_torch", lambda inputs, logits, stats: torch_calls.append(1) or "torch")
    device = torch.device("cuda", 0)
    inputs = type("Inputs", (), {"logits_real": type("T", (), {"device": device})()})()
    return step_triton, device, inputs, torch_calls


def test_auto_falls_back_to_torch_once_when_triton_cannot_build(fake_cuda, monkeypatch, caplog):
    step_triton, device, inputs, torch_calls = fake_cuda
    broken = _BrokenTriton(RuntimeError("Failed to find C compiler. Please specify via CC environment variable."))
    monkeypatch.setattr(step_triton, "step_triton", broken)
    with caplog.at_level(logging.WARNING, logger="safecode_kernels"):
        assert resolve_backend("auto", device)(inputs, False, False) == "torch"
        assert resolve_backend("auto", device)(inputs, False, False) == "torch"
    assert broken.calls == 1 and len(torch_calls) == 2  # Triton is not tried again
    [record] = [r for r in caplog.records if "falls back" in r.getMessage()]
    assert "RuntimeError: Failed to find C compiler" in record.getMessage()
    with pytest.raises(RuntimeError, match="C compiler"):  # an explicit backend still raises
        resolve_backend("triton", device)(inputs, False, False)


@pytest.mark.parametrize("error", [sk.StepError("logits_real row 0 contains NaN"), TypeError("bad input")])
def test_auto_does_not_hide_input_errors_behind_the_fallback(fake_cuda, monkeypatch, error):
    step_triton, device, inputs, torch_calls = fake_cuda
    monkeypatch.setattr(step_triton, "step_triton", _BrokenTriton(error))
    with pytest.raises(type(error)):
        resolve_backend("auto", device)(inputs, False, False)
    assert not torch_calls


def test_auto_raises_triton_errors_once_its_kernels_ran(fake_cuda, monkeypatch):
    step_triton, device, inputs, torch_calls = fake_cuda
    monkeypatch.setattr(step_triton, "step_triton", lambda inputs, logits, stats: "triton")
    assert resolve_backend("auto", device)(inputs, False, False) == "triton"
    monkeypatch.setattr(step_triton, "step_triton", _BrokenTriton(RuntimeError("launch failed")))
    with pytest.raises(RuntimeError, match="launch failed"):
        resolve_backend("auto", device)(inputs, False, False)
    assert not torch_calls
