"""``safecode-kernels info``: versions, and which step-op backends work here (and why not)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

import torch

PACKAGES = ("safecode-kernels", "torch", "transformers", "tokenizers", "numpy", "pillow", "triton", "openai", "tqdm")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect() -> dict:
    """Everything ``info`` reports, as a JSON-ready dict."""
    from .. import __version__
    from ..ops import step_cpu
    from ..ops.dispatch import backend_status

    versions = {"python": platform.python_version()}
    versions.update({name: _version(name) for name in PACKAGES})
    versions["safecode-kernels"] = __version__  # the imported one, even when not installed

    if torch.cuda.is_available():
        cuda = {
            "available": True,
            "torch_cuda": torch.version.cuda,
            "devices": [
                {
                    "index": i,
                    "name": torch.cuda.get_device_name(i),
                    "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                }
                for i in range(torch.cuda.device_count())
            ],
        }
    else:
        reason = (
            "this torch build has no CUDA support (a CPU build)"
            if torch.version.cuda is None
            else "torch has CUDA support but sees no CUDA device"
        )
        cuda = {"available": False, "torch_cuda": torch.version.cuda, "devices": [], "reason": reason}

    status = backend_status()
    backends = {name: {"available": reason is None, "reason": reason} for name, reason in status.items()}
    if step_cpu._C is not None:
        backends["cpu"]["extension"] = getattr(step_cpu._C, "__file__", None)
    override = os.environ.get("SAFECODE_BACKEND") or None
    auto = {"cpu": "cpu" if status["cpu"] is None else "torch"}
    if cuda["available"]:
        from ..ops import step_triton

        auto["cuda"] = "triton" if step_triton.unavailable_reason(torch.device("cuda")) is None else "torch"
    return {
        "versions": versions,
        "platform": {
            "system": platform.platform(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "executable": sys.executable,
        },
        "cuda": cuda,
        "backends": backends,
        "auto_backend": auto,
        "SAFECODE_BACKEND": override,
    }


def format_info(info: dict) -> str:
    """``info`` as readable text."""
    lines = ["safecode-kernels " + (info["versions"]["safecode-kernels"] or "?"), "", "Versions:"]
    for name, version in info["versions"].items():
        if name != "safecode-kernels":
            lines.append(f"  {name:<13} {version or 'not installed'}")
    p = info["platform"]
    lines += ["", f"Platform: {p['system']} ({p['machine']}), {p['cpus']} CPUs, {p['torch_threads']} torch threads"]
    cuda = info["cuda"]
    if cuda["available"]:
        lines.append(f"CUDA: {cuda['torch_cuda']}")
        lines += [f"  cuda:{d['index']}  {d['name']} (compute capability {d['capability']})" for d in cuda["devices"]]
    else:
        lines.append(f"CUDA: not available: {cuda['reason']}")
    lines += ["", "Backends of the step op:"]
    for name, b in info["backends"].items():
        state = "available" if b["available"] else f"unavailable: {b['reason']}"
        lines.append(f"  {name:<7} {state}")
    auto = ", ".join(f"{device} tensors -> {backend}" for device, backend in info["auto_backend"].items())
    lines.append(f"  auto    {auto}")
    if info["SAFECODE_BACKEND"]:
        lines.append(f"  SAFECODE_BACKEND={info['SAFECODE_BACKEND']} overrides auto")
    return "\n".join(lines)
