"""Scene-level verdicts (docs/design.md §1) and their conversion to the kernel's int8 encoding."""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch


class Verdict(enum.IntEnum):
    """A judge's verdict on one request. The integer values are the kernel's encoding."""

    UNSAFE = 1
    SAFE = -1
    NONE = 0

    @classmethod
    def parse(cls, value: Verdict | str | int) -> Verdict:
        """Accept a ``Verdict``, one of ``"unsafe" | "safe" | "none"`` or ``+1 / -1 / 0``."""
        if isinstance(value, Verdict):
            return value
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                raise ValueError(f"unknown verdict {value!r}: expected 'unsafe', 'safe' or 'none'") from None
        if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
            try:
                return cls(int(value))
            except ValueError:
                raise ValueError(
                    f"unknown verdict value {value}: expected +1 (unsafe), -1 (safe) or 0 (none)"
                ) from None
        raise TypeError(f"a verdict must be a Verdict, str or int, got {type(value).__name__}")


def parse_verdicts(verdicts: Sequence[Verdict | str | int]) -> list[Verdict]:
    """:meth:`Verdict.parse` of each verdict, in order; its ``ValueError`` or ``TypeError`` names the
    index (``"verdicts[2]: unknown verdict ..."``)."""
    parsed = []
    for i, verdict in enumerate(verdicts):
        try:
            parsed.append(Verdict.parse(verdict))
        except (ValueError, TypeError) as err:
            raise type(err)(f"verdicts[{i}]: {err}") from None
    return parsed


def as_verdict_tensor(
    verdict: torch.Tensor | Sequence[Verdict | str | int],
    batch: int,
    device: torch.device,
) -> torch.Tensor:
    """Return the verdicts of a batch as an int8 tensor of shape ``[batch]`` on ``device``."""
    device = torch.device(device)
    if isinstance(verdict, torch.Tensor):
        if verdict.dtype.is_floating_point or verdict.dtype.is_complex or verdict.dtype == torch.bool:
            raise TypeError(f"verdict must be an integer tensor (int8), got dtype {verdict.dtype}")
        if verdict.dim() != 1 or verdict.shape[0] != batch:
            raise ValueError(
                f"verdict must have shape [{batch}] (one per row of the logits), got {list(verdict.shape)}"
            )
        if verdict.device.type != device.type or (
            device.index is not None and verdict.device.index is not None and verdict.device.index != device.index
        ):
            raise ValueError(f"verdict is on {verdict.device} but the logits are on {device}: put them on one device")
        wide = verdict.to(torch.int64)  # uint8 would wrap -1 to 255
        bad = (wide < -1) | (wide > 1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"unknown verdict value {int(wide[row])} in row {row}: expected +1 (unsafe), -1 (safe) or 0 (none)"
            )
        return verdict.to(torch.int8).contiguous()  # kernels index it as a flat array
    if isinstance(verdict, (str, bytes)) or not isinstance(verdict, Sequence):
        raise TypeError(f"verdict must be an int8 tensor or a sequence of verdicts, got {type(verdict).__name__}")
    if len(verdict) != batch:
        raise ValueError(f"got {len(verdict)} verdicts for a batch of {batch} rows")
    values = [int(Verdict.parse(v)) for v in verdict]
    return torch.tensor(values, dtype=torch.int8, device=device)
