"""One weight read for both branches on the CPU: a small-batch path for ``nn.Linear``.

A steered decoding step runs ``2B`` rows (both branches of every request) through the model
so that one read of the weights serves both branches (design §3.4). On the CPU, PyTorch's
``F.linear`` (MKL ``sgemm`` with the weight transposed) does not do that for fewer than four
rows: it computes row by row, reading the weights once per row. Measured on the benchmark
machine (AMD EPYC, 1 thread, fp32, weights not in cache), milliseconds per call:

    ==========================  =====  =====  =====  =====  =====  =====
    rows                            1      2      3      4      8     16
    ==========================  =====  =====  =====  =====  =====  =====
    lm_head 32000x512 F.linear   4.36   8.38  12.39   6.89   7.63  11.03
    same, W @ x.T                4.35   2.54   3.53   2.87   5.71  12.06
    MLP 1376x512 F.linear        0.21   0.36   0.49   0.36   0.41   0.51
    same, W @ x.T                0.22   0.15   0.19   0.16   0.27   0.48
    ==========================  =====  =====  =====  =====  =====  =====

so a batch-2 decoding step cost 1.8x a batch-1 step (20 ms against 11 ms for the benchmark
LLaVA) and "fusing" the two branches saved nothing. Computing ``(W @ x.T).T`` instead reads
the weights once for all rows; the batch-2 step then costs about what a batch-1 step does.

:func:`small_batch_linear` switches the ``nn.Linear`` modules of a model to that form for
inputs of ``MIN_ROWS``..``MAX_ROWS`` rows (fp32 CPU tensors only; anything else takes the usual
path) while the context is open. The result equals ``F.linear`` up to float rounding (a
different summation order). Modules whose ``forward`` is already replaced on the instance
(for example by accelerate's device-map hooks) are left alone.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn

MIN_ROWS = 2
MAX_ROWS = 8


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // self.in_features if self.in_features else 0
    weight = self.weight
    if (
        not (MIN_ROWS <= rows <= MAX_ROWS)
        or x.dtype != torch.float32
        or weight.dtype != torch.float32
        or x.device.type != "cpu"
        or weight.device.type != "cpu"
    ):
        return nn.Linear.forward(self, x)
    flat = x.reshape(rows, self.in_features)
    if self.bias is None:
        out = torch.mm(weight, flat.t())
    else:
        out = torch.addmm(self.bias[:, None], weight, flat.t())
    return out.t().contiguous().view(*x.shape[:-1], self.out_features)


def eligible(model) -> bool:
    """Whether the model's weights are fp32 on the CPU (where the small-batch path pays)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.device.type == "cpu" and weight.dtype == torch.float32


@contextlib.contextmanager
def small_batch_linear(model, enabled: bool = True):
    """Within the context, ``nn.Linear`` modules of ``model`` use ``(W @ x.T).T`` for inputs
    of 2 to 8 rows (fp32, CPU). Restores the modules on exit, also after an error."""
    patched = []
    if enabled and eligible(model):
        for module in model.modules():
            if type(module) is nn.Linear and "forward" not in module.__dict__:
                module.forward = types.MethodType(_forward, module)
                patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
