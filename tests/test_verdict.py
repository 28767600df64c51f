"""Verdict parsing and the kernel's int8 verdict tensor (docs/design.md §1-§2)."""

from __future__ import annotations

import pytest
import torch

from safecode_kernels.verdict import Verdict, as_verdict_tensor

CPU = torch.device("cpu")


# ----- Verdict.parse ------------------------------------------------------------------------


def test_encoding_is_the_kernels():
    assert (int(Verdict.UNSAFE), int(Verdict.SAFE), int(Verdict.NONE)) == (1, -1, 0)


@pytest.mark.parametrize(
    "value,expected",
    [
        (Verdict.UNSAFE, Verdict.UNSAFE),
        ("unsafe", Verdict.UNSAFE),
        ("SAFE", Verdict.SAFE),
        (" None\n", Verdict.NONE),
        ("Unsafe", Verdict.UNSAFE),
        (1, Verdict.UNSAFE),
        (-1, Verdict.SAFE),
        (0, Verdict.NONE),
    ],
)
def test_parse(value, expected):
    assert Verdict.parse(value) is expected


@pytest.mark.parametrize("value", ["maybe", "", "un safe", "1"])
def test_parse_unknown_string(value):
    with pytest.raises(ValueError, match="unknown verdict"):
        Verdict.parse(value)


@pytest.mark.parametrize("value", [2, -2, 127])
def test_parse_unknown_int(value):
    with pytest.raises(ValueError, match=f"unknown verdict value {value}"):
        Verdict.parse(value)


@pytest.mark.parametrize("value", [True, False, 1.0, None, b"safe", [1]])
def test_parse_wrong_type(value):
    with pytest.raises(TypeError, match="verdict must be"):
        Verdict.parse(value)


# ----- as_verdict_tensor: sequences -----------------------------------------------------------


def test_sequence_of_mixed_forms():
    out = as_verdict_tensor(["unsafe", Verdict.SAFE, 0, -1, "none"], 5, CPU)
    assert out.dtype == torch.int8 and out.device == CPU
    assert out.tolist() == [1, -1, 0, -1, 0]
    assert as_verdict_tensor((1, 1), 2, CPU).tolist() == [1, 1]


def test_empty_batch():
    out = as_verdict_tensor([], 0, CPU)
    assert out.dtype == torch.int8 and out.shape == (0,)


@pytest.mark.parametrize("verdict,batch", [(["safe"], 2), (["safe", "unsafe", "none"], 2), ([], 1)])
def test_sequence_of_wrong_length(verdict, batch):
    with pytest.raises(ValueError, match=f"got {len(verdict)} verdicts for a batch of {batch}"):
        as_verdict_tensor(verdict, batch, CPU)


def test_sequence_with_unknown_value():
    with pytest.raises(ValueError, match="unknown verdict"):
        as_verdict_tensor(["safe", "dunno"], 2, CPU)
    with pytest.raises(ValueError, match="unknown verdict value 3"):
        as_verdict_tensor([0, 3], 2, CPU)
    with pytest.raises(TypeError):
        as_verdict_tensor([0, 1.0], 2, CPU)


@pytest.mark.parametrize("verdict", ["unsafe", b"\x01", 1, None, (v for v in [1])])
def test_not_a_sequence(verdict):
    with pytest.raises(TypeError, match="verdict must be"):
        as_verdict_tensor(verdict, 1, CPU)


# ----- as_verdict_tensor: tensors -------------------------------------------------------------


def test_int8_tensor_passes_through():
    v = torch.tensor([1, -1, 0], dtype=torch.int8)
    out = as_verdict_tensor(v, 3, CPU)
    assert out.dtype == torch.int8 and torch.equal(out, v)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64])
def test_other_integer_tensors_are_converted(dtype):
    out = as_verdict_tensor(torch.tensor([0, 1, -1], dtype=dtype), 3, CPU)
    assert out.dtype == torch.int8 and out.tolist() == [0, 1, -1]


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.bool, torch.complex64]
)
def test_non_integer_tensors_are_rejected(dtype):
    with pytest.raises(TypeError, match="integer tensor"):
        as_verdict_tensor(torch.zeros(2, dtype=dtype), 2, CPU)


@pytest.mark.parametrize("shape", [(3,), (1,), (2, 1), (1, 2), ()])
def test_tensor_of_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        as_verdict_tensor(torch.zeros(shape, dtype=torch.int8), 2, CPU)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64])
def test_tensor_with_unknown_value_names_the_row(dtype):
    v = torch.tensor([1, 0, 2, -5], dtype=dtype)
    with pytest.raises(ValueError, match="unknown verdict value 2 in row 2"):
        as_verdict_tensor(v, 4, CPU)


def test_out_of_int8_range_value_is_rejected_not_wrapped():
    # 257 would wrap to 1 (unsafe) if cast to int8 before the check.
    with pytest.raises(ValueError, match="257 in row 0"):
        as_verdict_tensor(torch.tensor([257], dtype=torch.int64), 1, CPU)


def test_uint8_255_is_rejected():
    with pytest.raises(ValueError, match="unknown verdict"):
        as_verdict_tensor(torch.tensor([255], dtype=torch.uint8), 1, CPU)


def test_tensor_on_another_device():
    # The meta device stands in for a GPU: the check needs no data, so it runs on CPU.
    with pytest.raises(ValueError, match="verdict is on meta but the logits are on cpu"):
        as_verdict_tensor(torch.zeros(2, dtype=torch.int8, device="meta"), 2, CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_tensor_on_cpu_with_logits_on_gpu():
    with pytest.raises(ValueError, match="put them on one device"):
        as_verdict_tensor(torch.zeros(2, dtype=torch.int8), 2, torch.device("cuda", 0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_sequence_lands_on_the_logits_device():
    out = as_verdict_tensor(["safe", "unsafe"], 2, torch.device("cuda", 0))
    assert out.device == torch.device("cuda", 0) and out.tolist() == [-1, 1]


def test_device_given_as_string():
    out = as_verdict_tensor(torch.tensor([1], dtype=torch.int8), 1, "cpu")
    assert out.tolist() == [1]
