"""The refusal token set R of SPEC §1: ids, and a cached bool mask per device and vocabulary size."""

from __future__ import annotations

from collections.abc import Iterable

import torch


class RefusalVocabulary:
    """A sorted, deduplicated set of refusal token ids.

    The step op needs the set both as ids and as a bool mask over the vocabulary; both are
    built once per ``(vocab_size, device)`` and cached, so steering many steps costs nothing.
    """

    def __init__(self, ids: Iterable[int]):
        values = sorted({int(i) for i in ids})
        if values and values[0] < 0:
            raise ValueError(f"refusal ids must be >= 0, got {values[0]}")
        self._ids = torch.tensor(values, dtype=torch.int64)
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def ids(self) -> torch.Tensor:
        """Sorted unique int64 ids on the CPU."""
        return self._ids

    def __len__(self) -> int:
        return self._ids.numel()

    def __repr__(self) -> str:
        return f"RefusalVocabulary({len(self)} tokens)"

    def _entry(self, vocab_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device)
        key = (vocab_size, str(device))
        if key not in self._cache:
            if len(self) and int(self._ids[-1]) >= vocab_size:
                raise ValueError(
                    f"refusal id {int(self._ids[-1])} is outside the vocabulary [0, {vocab_size})"
                )
            ids = self._ids.to(device)
            mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            mask[ids] = True
            self._cache[key] = (mask, ids)
        return self._cache[key]

    def mask(self, vocab_size: int, device="cpu") -> torch.Tensor:
        """Bool mask ``[vocab_size]`` on ``device`` (cached)."""
        return self._entry(vocab_size, device)[0]

    def ids_on(self, vocab_size: int, device="cpu") -> torch.Tensor:
        """The ids on ``device``, checked against ``vocab_size`` (cached)."""
        return self._entry(vocab_size, device)[1]
