"""The ``torch`` backend of the step op: the readable reference of docs/design.md §2, op by op.

It is also the naive baseline that the benchmarks compare against, so it is written the
way a careful PyTorch user would write it: vectorised over the batch, no Python loops
over rows or tokens.
"""

from __future__ import annotations

import functools
import math

import torch

from .codes import RowStatus, Verdict
from .step_inputs import ROW_PROBLEMS, StepError, StepInputs

NEG_INF = float("-inf")


def step_torch(inp: StepInputs, return_logits: bool, return_stats: bool, read_status: bool = True):
    """Returns ``(tokens [B] int64, logits [B, V] fp32 | None, (before, after) | None)``.

    ``read_status=False`` (for decoders): problems are not raised here (no host sync) but
    recorded per row, first in check order, and ``(tokens, logits, stats, status)`` is
    returned with ``status`` ``[B]`` int32 ``RowStatus`` codes; the tokens of such rows are
    meaningless. :func:`.step_pending.finish_step` raises the error."""
    p = inp.params
    zr = inp.logits_real.float()
    zn = inp.logits_noised.float()
    status = None if read_status else torch.zeros(zr.shape[0], dtype=torch.int32, device=zr.device)
    _check_rows(zr, RowStatus.REAL_NOT_FINITE, status)
    _check_rows(zn, RowStatus.NOISED_NOT_FINITE, status)

    # 1. Contrast. A -inf in either branch bans the token (it would give inf - inf otherwise).
    safe = (inp.verdict == Verdict.SAFE).unsqueeze(1)
    alpha = torch.where(safe, p.alpha_safe, p.alpha).to(zr.dtype)
    banned = (zr == NEG_INF) | (zn == NEG_INF)
    if p.plausibility > 0.0:
        cutoff = math.log(p.plausibility) + zr.amax(dim=1, keepdim=True)
        banned |= zr < cutoff
    z = (p.real_weight * zr - alpha * zn).masked_fill(banned, NEG_INF)
    _check_modulated(z, RowStatus.ALL_BANNED_CONTRAST, RowStatus.OVERFLOW_CONTRAST, status)

    # 2-3. Sensitive set and verdict-conditioned refusal bias.
    target = inp.refusal_mask.unsqueeze(0)
    if p.scope == "sensitive":
        target = target & top_k_mask(z, p.sensitive_top_k)
    bias = torch.zeros(z.shape[0], 1, dtype=z.dtype, device=z.device)
    bias = bias.masked_fill((inp.verdict == Verdict.UNSAFE).unsqueeze(1), p.bias_unsafe)
    bias = bias.masked_fill(safe, p.bias_safe)
    modulated = torch.where(target, z + bias, z)
    _check_modulated(modulated, RowStatus.ALL_BANNED_BIAS, RowStatus.OVERFLOW_BIAS, status)

    stats = None
    if return_stats:
        stats = (_refusal_mass(z, inp.refusal_mask), _refusal_mass(modulated, inp.refusal_mask))

    # 4. Token choice.
    if decodes_greedily(p):
        tokens = modulated.argmax(dim=1)
    else:
        # Rows with a problem sample from zeros instead (multinomial rejects NaN); their
        # tokens are discarded with the error.
        chosen = modulated if status is None else modulated.masked_fill((status != 0)[:, None], 0.0)
        tokens = _sample(chosen, p.temperature, p.top_k, p.top_p, inp.seed)
    if status is not None:
        return tokens, (modulated if return_logits else None), stats, status
    return tokens, (modulated if return_logits else None), stats


def decodes_greedily(p) -> bool:
    """Whether a step with :class:`~safecode_kernels.SteeringParams` ``p`` takes the argmax:
    temperature 0, or a temperature so small that ``1 / T`` overflows float32 (``T`` below
    about 2.9e-39, which includes those that round to 0 in float32). Below the maximum every
    token then has probability 0; the argmax breaks ties toward the lower index, as greedy
    decoding does. Every backend decides this the same way."""
    if p.is_greedy:
        return True
    return _inverse_overflows(p.temperature)


@functools.lru_cache(maxsize=64)
def _inverse_overflows(temperature: float) -> bool:
    # Cached: a decoder asks every step, and the float32 tensor's read is a host read.
    return bool(torch.isinf(1.0 / torch.tensor(temperature, dtype=torch.float32)))


def top_k_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries per row; ties go to the lower index."""
    vocab = x.shape[1]
    if k >= vocab:
        return torch.ones_like(x, dtype=torch.bool)
    if k == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    kth = torch.topk(x, k, dim=1).values[:, -1:]
    greater = x > kth
    equal = x == kth
    room = k - greater.sum(dim=1, keepdim=True)
    return greater | (equal & (equal.cumsum(dim=1) <= room))


def _sample(logits, temperature, top_k, top_p, seed) -> torch.Tensor:
    # Hugging Face's order: temperature, then top-k, then top-p.
    # Shift by the row maximum first: dividing huge finite logits by a temperature < 1
    # would overflow to inf.
    logits = (logits - logits.amax(dim=1, keepdim=True)) / temperature
    if 0 < top_k < logits.shape[1]:
        logits = logits.masked_fill(~top_k_mask(logits, top_k), NEG_INF)
    if top_p < 1.0:
        ordered, order = torch.sort(logits, dim=1, descending=True, stable=True)
        probs = ordered.softmax(dim=1)
        mass_before = probs.cumsum(dim=1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, NEG_INF)
    generator = torch.Generator(device=logits.device).manual_seed(seed)
    return torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)


def _refusal_mass(z: torch.Tensor, refusal_mask: torch.Tensor) -> torch.Tensor:
    return (z.softmax(dim=1) * refusal_mask).sum(dim=1)


def _check_rows(x: torch.Tensor, code: RowStatus, status: torch.Tensor | None) -> None:
    # One reduction per input finds both NaN (max propagates it) and +inf.
    row_max = x.amax(dim=1)
    _raise_first(torch.isnan(row_max) | (row_max == float("inf")), code, status)


def _check_modulated(z: torch.Tensor, all_banned: RowStatus, overflow: RowStatus, status: torch.Tensor | None) -> None:
    row_max = z.amax(dim=1)
    _raise_first(row_max == NEG_INF, all_banned, status)
    _raise_first(torch.isnan(row_max) | (row_max == float("inf")), overflow, status)


def _raise_first(bad: torch.Tensor, code: RowStatus, status: torch.Tensor | None) -> None:
    if status is not None:  # recorded, not raised: a row keeps its first problem
        status.masked_fill_(bad & (status == 0), int(code))
        return
    if bool(bad.any()):
        raise StepError(ROW_PROBLEMS[code].format(row=int(bad.nonzero()[0, 0])))
