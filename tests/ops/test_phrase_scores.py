"""The phrase-score op against a plain loop over phrases and tokens."""

from __future__ import annotations

import pytest
import torch

from safecode_kernels.ops.phrase_scores import phrase_scores, phrase_table


def loop(probs, phrases):
    return torch.tensor([[sum(float(row[i]) for i in ids if i < row.shape[0]) for ids in phrases] for row in probs])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_a_loop(dtype):
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 50, generator=g).softmax(-1).to(dtype)
    phrases = [[1, 2, 3], [7], [], [49, 50, 60], [5, 5]]  # empty, out-of-vocabulary ids, a repeated id
    got = phrase_scores(probs, phrase_table(phrases))
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    torch.testing.assert_close(got, loop(probs.float(), phrases), rtol=1e-6, atol=1e-7)
    assert torch.all(got[:, 2] == 0)


def test_table_and_errors():
    table = phrase_table([[4, 5], [6]])
    assert table.tolist() == [[4, 5], [6, -1]]
    assert phrase_table([]).shape == (0, 1)
    assert phrase_scores(torch.ones(2, 8) / 8, phrase_table([])).shape == (2, 0)
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        phrase_scores(torch.ones(8), table)
    with pytest.raises(ValueError, match="table is on cpu but probs are on meta"):
        phrase_scores(torch.ones(2, 8, device="meta"), table)
