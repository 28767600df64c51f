"""Input preparation of the step: a refusal set of any accepted form follows the logits'
device (checked where its values are, then copied), as a RefusalVocabulary does."""

from __future__ import annotations

import pytest
import torch

from safecode_kernels import RefusalVocabulary, SteeringParams
from safecode_kernels.ops.step_inputs import prepare_step_inputs

VOCAB = 1000
IDS = [3, 17]


def _mask() -> torch.Tensor:
    return torch.zeros(VOCAB, dtype=torch.bool).index_fill(0, torch.tensor(IDS), True)


FORMS = {
    "list": lambda: list(IDS),
    "tuple": lambda: tuple(IDS),
    "int64 ids": lambda: torch.tensor(IDS),
    "int32 ids": lambda: torch.tensor(IDS, dtype=torch.int32),
    "bool mask": _mask,
    "vocabulary": lambda: RefusalVocabulary(IDS),
}


@pytest.mark.parametrize("form", FORMS)
def test_every_refusal_form_follows_the_logits_device(form):
    """Logits on another device than the CPU-held set (``meta`` stands in for CUDA here)."""
    logits = torch.empty(2, VOCAB, device="meta")
    inputs = prepare_step_inputs(logits, logits, ["safe", "unsafe"], FORMS[form](), SteeringParams(), None)
    assert inputs.refusal_mask.device == logits.device and inputs.refusal_ids.device == logits.device
    assert inputs.refusal_mask.shape == (VOCAB,) and inputs.refusal_ids.shape == (len(IDS),)


@pytest.mark.parametrize("form", FORMS)
def test_every_refusal_form_gives_the_same_set(form):
    logits = torch.zeros(2, VOCAB)
    inputs = prepare_step_inputs(logits, logits, ["safe", "unsafe"], FORMS[form](), SteeringParams(), None)
    assert inputs.refusal_ids.tolist() == IDS
    assert inputs.refusal_mask.nonzero().flatten().tolist() == IDS


def test_ids_on_another_device_are_checked_where_they_are():
    logits = torch.empty(2, VOCAB, device="meta")
    with pytest.raises(ValueError, match="refusal id 1000 is outside the vocabulary"):
        prepare_step_inputs(logits, logits, ["safe", "safe"], torch.tensor([3, 1000]), SteeringParams(), None)
    with pytest.raises(ValueError, match="sorted and unique"):
        prepare_step_inputs(logits, logits, ["safe", "safe"], [17, 3], SteeringParams(), None)
