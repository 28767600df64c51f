"""Checks and normalises the inputs of the step op, once, for every backend (docs/design.md §2)."""

from __future__ import annotations

import dataclasses
import weakref

import torch

from ..params import SteeringParams
from ..refusal import RefusalVocabulary
from ..verdict import as_verdict_tensor
from .codes import RowStatus

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class StepInputs:
    """The validated inputs of one step: logits ``[B, V]`` (vocabulary stride 1), int8
    verdicts ``[B]``, the refusal set as a bool mask ``[V]`` and as sorted ids, and the seed
    for sampling (``None`` when greedy).

    Read-only by convention (not frozen: a frozen dataclass costs a microsecond more to
    build, on every step). ``kernel_layout`` is True when :func:`prepare_step_inputs` or
    :func:`fast_step_inputs` built it: then every tensor is on one device, the verdicts and
    ids are contiguous int8 / int64 and the logits have unit vocabulary stride, which lets a
    kernel take raw addresses without checking the layout again."""

    logits_real: torch.Tensor
    logits_noised: torch.Tensor
    verdict: torch.Tensor
    refusal_mask: torch.Tensor
    refusal_ids: torch.Tensor
    params: SteeringParams
    seed: int | None
    kernel_layout: bool = False

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
    """Check and normalise every kind of input the step accepts (lists, strided rows, masks, ...)."""
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
        True,
    )


def fast_step_inputs(logits_real, logits_noised, verdict, refusal, params, generator) -> StepInputs | None:
    """The inputs of the call a decoder makes every step, checked at the cost of a few
    attribute reads, or ``None`` for any other input (then :func:`prepare_step_inputs` checks
    it fully): two ``[B, V]`` tensors of one supported dtype and device with unit vocabulary
    stride, a contiguous int8 verdict tensor ``[B]`` on that device, a
    :class:`RefusalVocabulary` (its ids and mask cached per device and size) and a
    :class:`SteeringParams`. Nothing is created or converted. The logits' values (NaN, +inf)
    are checked by every kernel in its row status words; the verdicts' values are not checked
    here: the caller runs :func:`check_verdict_values` unless its backend checks them itself.
    """
    tensor = torch.Tensor
    if (
        type(logits_real) is not tensor
        or type(logits_noised) is not tensor
        or type(verdict) is not tensor
        or type(refusal) is not RefusalVocabulary
        or type(params) is not SteeringParams
    ):
        return None
    dtype = logits_real.dtype
    shape = logits_real.shape
    if len(shape) != 2 or logits_noised.shape != shape or dtype not in SUPPORTED_DTYPES or logits_noised.dtype != dtype:
        return None
    batch, vocab = shape
    verdict_shape = verdict.shape
    if (
        batch == 0
        or vocab == 0
        or logits_real.stride()[1] != 1
        or logits_noised.stride()[1] != 1
        or verdict.dtype != torch.int8
        or len(verdict_shape) != 1
        or verdict_shape[0] != batch
        or not verdict.is_contiguous()
    ):
        return None
    device = logits_real.device
    if logits_noised.device != device or verdict.device != device:
        return None
    mask, ids = _refusal_on(refusal, vocab, device)
    seed = None if params.temperature == 0.0 else seed_from(generator)
    return StepInputs(logits_real, logits_noised, verdict, mask, ids, params, seed, True)


# The last (refusal set, vocabulary size, device) looked up and its (mask, ids): a decoder
# passes the same set every step, and the set's own cache keys on str(device).
_last_refusal: tuple = (None, 0, None, None)


def _refusal_on(refusal: RefusalVocabulary, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    global _last_refusal
    cached, cached_vocab, cached_device, entry = _last_refusal
    if cached is refusal and cached_vocab == vocab and cached_device == device:
        return entry
    entry = refusal_mask_and_ids(refusal, vocab, device)
    _last_refusal = (refusal, vocab, device, entry)
    return entry


# The last verdict tensor whose values were checked, and its version counter then: a decoder
# that keeps one verdict tensor for a batch has it checked once (and again after any in-place
# change, which bumps the counter), not on every step.
_last_verdict: tuple = (None, -1)


def check_verdict_values(verdict: torch.Tensor) -> None:
    """Raise ``ValueError`` if an int8 verdict tensor holds a value other than +1, -1 or 0
    (what :func:`~safecode_kernels.verdict.as_verdict_tensor` checks); skipped for the tensor
    checked last when it was not modified since."""
    global _last_verdict
    ref, version = _last_verdict
    try:
        current = verdict._version
    except RuntimeError:  # an inference tensor has no version counter: check it every time
        current = None
    if current is not None and ref is not None and ref() is verdict and version == current:
        return
    as_verdict_tensor(verdict, verdict.shape[0], verdict.device)
    if current is not None:
        _last_verdict = (weakref.ref(verdict), current)


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
    """The refusal set as ``(bool mask [vocab], sorted int64 ids)`` on ``device``, the logits'.

    A :class:`RefusalVocabulary` gives its cached pair for ``device``; a list, or a tensor on
    another device (CPU ids with CUDA logits, say), is checked where its values are and then
    copied to ``device``, on every call: wrap a set used every step in a ``RefusalVocabulary``.
    """
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
        mask, ids = refusal_mask_and_ids(refusal, vocab, refusal.device)
        return mask.to(device), ids.to(device)
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
    the same generator state reproduces the same tokens. A CUDA generator draws on its device
    and the seed is read back (a host sync); a CPU generator reads nothing from a device.
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
