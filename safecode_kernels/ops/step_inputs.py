"""Checks and normalises the inputs of the step op, once, for every backend (docs/design.md §2)."""

from __future__ import annotations

import dataclasses

import torch

from ..params import SteeringParams
from ..refusal import RefusalVocabulary
from ..verdict import as_verdict_tensor
from .codes import RowStatus

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class StepInputs:
    """The validated inputs of one step: logits ``[B, V]`` (vocabulary stride 1), int8
    verdicts ``[B]``, the refusal set as a bool mask ``[V]`` and as sorted ids, and the seed
    for sampling (``None`` when greedy)."""

    logits_real: torch.Tensor
    logits_noised: torch.Tensor
    verdict: torch.Tensor
    refusal_mask: torch.Tensor
    refusal_ids: torch.Tensor
    params: SteeringParams
    seed: int | None

    @property
    def batch(self) -> int:
        return self.logits_real.shape[0]

    @property
    def vocab(self) -> int:
        return self.logits_real.shape[1]


class StepError(ValueError):
    """A row of the step's input that has no valid answer (NaN, +inf, every token banned)."""


# Row problems, in the order every backend checks them (codes.RowStatus).
ROW_PROBLEMS = {
    RowStatus.REAL_NOT_FINITE: "logits_real row {row} contains NaN or +inf (only -inf, meaning banned, is allowed)",
    RowStatus.NOISED_NOT_FINITE: "logits_noised row {row} contains NaN or +inf (only -inf, meaning banned, is allowed)",
    RowStatus.ALL_BANNED_CONTRAST: "row {row}: every token is banned after the contrast",
    RowStatus.OVERFLOW_CONTRAST: "row {row}: the contrast overflows float32 (logits too large)",
    RowStatus.ALL_BANNED_BIAS: "row {row}: every token is banned after the refusal bias",
    RowStatus.OVERFLOW_BIAS: "row {row}: the refusal bias overflows float32 (logits too large)",
}


def raise_for_row_status(status: torch.Tensor) -> None:
    """Raise the :class:`StepError` a backend's per-row status codes describe, if any:
    the first problem in check order, in the lowest row that has it."""
    if not bool(status.any()):
        return
    code = int(status[status != 0].min())
    row = int((status == code).nonzero()[0, 0])
    raise StepError(ROW_PROBLEMS[code].format(row=row))


def prepare_step_inputs(logits_real, logits_noised, verdict, refusal, params, generator) -> StepInputs:
    check_logits(logits_real, logits_noised)
    if not isinstance(params, SteeringParams):
        raise TypeError(f"params must be a SteeringParams, got {type(params).__name__}")
    batch, vocab = logits_real.shape
    device = logits_real.device
    verdict = as_verdict_tensor(verdict, batch, device)
    mask, ids = refusal_mask_and_ids(refusal, vocab, device)
    mask, ids = mask.contiguous(), ids.contiguous()  # kernels index them as flat arrays
    seed = None if params.is_greedy else seed_from(generator)
    return StepInputs(
        _unit_vocab_stride(logits_real),
        _unit_vocab_stride(logits_noised),
        verdict,
        mask,
        ids,
        params,
        seed,
    )


def check_logits(real, noised) -> None:
    for name, t in (("logits_real", real), ("logits_noised", noised)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape [batch, vocab], got {list(t.shape)}")
    if real.shape != noised.shape:
        raise ValueError(f"logits_real {list(real.shape)} and logits_noised {list(noised.shape)} differ in shape")
    if real.dtype != noised.dtype:
        raise TypeError(f"logits_real is {real.dtype} but logits_noised is {noised.dtype}")
    if real.device != noised.device:
        raise ValueError(f"logits_real is on {real.device} but logits_noised is on {noised.device}")
    if real.shape[1] == 0:
        raise ValueError("the vocabulary is empty (V = 0)")
    if real.shape[0] == 0:
        raise ValueError("the batch is empty (B = 0)")


def _unit_vocab_stride(t: torch.Tensor) -> torch.Tensor:
    # Rows may be strided (a slice of a larger batch); tokens within a row must be adjacent.
    return t if t.stride(1) == 1 else t.contiguous()


def refusal_mask_and_ids(refusal, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The refusal set as ``(bool mask [vocab], sorted int64 ids)`` on ``device``."""
    if isinstance(refusal, RefusalVocabulary):
        return refusal.mask(vocab, device), refusal.ids_on(vocab, device)
    if isinstance(refusal, (list, tuple)):
        refusal = torch.tensor(refusal, dtype=torch.int64)
    if not isinstance(refusal, torch.Tensor):
        raise TypeError(
            "refusal must be a RefusalVocabulary, a sorted int64 id tensor or a bool mask, "
            f"got {type(refusal).__name__}"
        )
    if refusal.device != device:
        raise ValueError(f"refusal is on {refusal.device} but the logits are on {device}")
    if refusal.dtype == torch.bool:
        if refusal.shape != (vocab,):
            raise ValueError(f"the refusal mask must have shape [{vocab}] (the vocabulary), got {list(refusal.shape)}")
        return refusal, refusal.nonzero().flatten()
    if refusal.dtype.is_floating_point or refusal.dtype.is_complex:
        raise TypeError(f"refusal ids must be an integer tensor, got dtype {refusal.dtype}")
    if refusal.dim() != 1:
        raise ValueError(f"refusal ids must be 1-D, got shape {list(refusal.shape)}")
    ids = refusal.to(torch.int64)
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            bad = low if low < 0 else high
            raise ValueError(f"refusal id {bad} is outside the vocabulary [0, {vocab})")
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError("refusal ids must be sorted and unique (use torch.unique)")
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask[ids] = True
    return mask, ids


def seed_from(generator) -> int:
    """A 62-bit seed from ``None`` (torch's default generator), an int or a ``torch.Generator``.

    Drawing from a generator advances it, so successive steps get different streams while
    the same generator state reproduces the same tokens.
    """
    if generator is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(generator, torch.Generator):
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    if isinstance(generator, int) and not isinstance(generator, bool):
        if generator < 0:
            raise ValueError(f"a seed must be >= 0, got {generator}")
        return generator % 2**62
    raise TypeError(f"generator must be None, an int seed or a torch.Generator, got {type(generator).__name__}")
