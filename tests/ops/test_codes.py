"""The integers shared by the backends (ops/codes.py) agree with the C++ kernel's and the
Triton kernels' copies, so that they cannot drift apart."""

from __future__ import annotations

import pytest
import torch

from safecode_kernels.ops import codes, step_cpu
from safecode_kernels.ops.step_inputs import ROW_PROBLEMS, StepError, raise_for_row_status

needs_extension = pytest.mark.skipif(
    step_cpu.unavailable_reason() is not None,
    reason=f"the C++ extension is unavailable: {step_cpu.unavailable_reason()}",
)


def _members(enum) -> dict[str, int]:
    return {member.name: int(member) for member in enum}


@needs_extension
def test_row_status_matches_the_cpp_kernel():
    assert dict(step_cpu._C.ROW_STATUS) == _members(codes.RowStatus)


@needs_extension
def test_verdict_matches_the_cpp_kernel():
    assert dict(step_cpu._C.VERDICT) == _members(codes.Verdict)


@needs_extension
def test_dtype_names_match_the_cpp_kernel():
    assert set(step_cpu._DTYPE_NAMES.values()) == set(step_cpu._C.DTYPES)
    assert sorted(step_cpu._C.DTYPES.values()) == list(range(len(step_cpu._C.DTYPES)))


def test_every_problem_has_a_message():
    assert set(ROW_PROBLEMS) == set(codes.RowStatus) - {codes.RowStatus.OK}
    for code in ROW_PROBLEMS:
        with pytest.raises(StepError, match="row 2"):
            raise_for_row_status(torch.tensor([0, 0, int(code)], dtype=torch.int32))


def test_status_fits_below_the_fallback_flag():
    assert max(codes.RowStatus) < codes.FALLBACK_FLAG
    assert codes.STATUS_MASK & codes.FALLBACK_FLAG == 0
    assert all(code & codes.STATUS_MASK == code for code in codes.RowStatus)


def test_triton_constexprs_match():
    pytest.importorskip("triton", reason="triton is not installed")
    from safecode_kernels.ops import step_triton_kernels as kernels

    def value(name):
        return getattr(kernels, name).value

    for member in codes.RowStatus:
        assert value(f"STATUS_{member.name}") == member
    for member in codes.SensitiveSet:
        assert value(f"SENS_{member.name}") == member
    assert value("VERDICT_UNSAFE") == codes.Verdict.UNSAFE
    assert value("VERDICT_SAFE") == codes.Verdict.SAFE
    assert value("FALLBACK_FLAG") == codes.FALLBACK_FLAG


@pytest.mark.parametrize(
    ("scope", "k", "vocab", "expected"),
    [
        ("all", 0, 10, codes.SensitiveSet.ALL),
        ("sensitive", 10, 10, codes.SensitiveSet.ALL),
        ("sensitive", 0, 10, codes.SensitiveSet.NONE),
        ("sensitive", 3, 10, codes.SensitiveSet.TOP_K),
    ],
)
def test_sensitive_set(scope, k, vocab, expected):
    assert codes.sensitive_set(scope, k, vocab) is expected


def test_scope_codes():
    assert codes.Scope.of("sensitive") is codes.Scope.SENSITIVE
    assert codes.Scope.of("all") is codes.Scope.ALL
