"""Choosing the step op's backend: by device, per call, and by SAFECODE_BACKEND."""

from __future__ import annotations

import pytest
import torch

import safecode_kernels as sk
from safecode_kernels.ops.dispatch import BACKENDS, backend_status, resolve_backend
from safecode_kernels.ops import step_cpu, step_torch

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
