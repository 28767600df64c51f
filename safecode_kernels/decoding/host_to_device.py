"""Small host values (token ids, row indices, per-row settings) onto the device without a wait.

``torch.tensor(values, device="cuda")`` copies from pageable host memory and then waits for
the stream: on a decoding step that is a full sync behind the queued forward. Values copied
from pinned memory with ``non_blocking=True`` are queued like a kernel instead; PyTorch's
pinned-memory allocator keeps the host block until the copy has run.
"""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """``values`` (a list of Python numbers) as a 1-D ``dtype`` tensor on ``device``; on CUDA
    through pinned memory, queued on the current stream without a host sync."""
    device = torch.device(device)
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)
