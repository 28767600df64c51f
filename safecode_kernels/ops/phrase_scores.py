"""Phrase scores: the summed probability of each phrase's tokens, for a batch of rows.

The released SafeCoDe code ranks its refusal phrases by this score on an unsafe verdict
(see :class:`safecode_kernels.ReleasedRecipe`). One gather and one sum over a padded
``[phrases, tokens]`` id table: no loop over phrases or over the vocabulary.
"""

from __future__ import annotations

import torch


def phrase_table(phrase_ids: list[list[int]], device="cpu") -> torch.Tensor:
    """The padded id table ``[P, L]`` int64 of ``P`` phrases (``-1`` pads); ``L >= 1``."""
    width = max([len(ids) for ids in phrase_ids] + [1])
    table = torch.full((len(phrase_ids), width), -1, dtype=torch.int64)
    for row, ids in enumerate(phrase_ids):
        if ids:
            table[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.int64)
    return table.to(device)


def phrase_scores(probs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``scores[b, j] = sum_t probs[b, table[j, t]]`` over the valid ids of phrase ``j``.

    Args:
        probs: ``[B, V]`` probabilities (any float dtype; summed in fp32).
        table: ``[P, L]`` int64 from :func:`phrase_table`; ``-1`` pads, and ids ``>= V`` add
            nothing (as in the released code, which skips them). A repeated id counts once per
            occurrence.

    Returns ``[B, P]`` fp32. Raises ``ValueError`` for wrong ranks or devices.
    """
    if probs.dim() != 2 or table.dim() != 2:
        raise ValueError(f"probs must be [B, V] and table [P, L], got {tuple(probs.shape)} and {tuple(table.shape)}")
    if table.device != probs.device:
        raise ValueError(f"table is on {table.device} but probs are on {probs.device}")
    valid = (table >= 0) & (table < probs.shape[1])
    gathered = probs.float()[:, table.clamp(0, probs.shape[1] - 1).reshape(-1)].reshape(probs.shape[0], *table.shape)
    return (gathered * valid).sum(-1)
