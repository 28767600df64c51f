"""SteeringParams and the probability-weight conversion (docs/design.md §1-§2)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from safecode_kernels.params import SteeringParams, probability_weights_to_logit_biases

# ----- defaults and validation ------------------------------------------------------------


def test_defaults_are_the_released_codes():
    p = SteeringParams()
    assert (p.alpha, p.alpha_safe, p.real_weight) == (0.3, 0.15, 1.0)
    assert (p.sensitive_top_k, p.scope, p.boost, p.suppress) == (20, "sensitive", 1.0, 1.0)
    assert (p.plausibility, p.temperature, p.top_k, p.top_p) == (0.0, 0.0, 0, 1.0)
    assert p.is_greedy and p.bias_unsafe == 1.0 and p.bias_safe == -1.0


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 2.5])
def test_alpha_safe_defaults_to_half_alpha(alpha):
    assert SteeringParams(alpha=alpha).alpha_safe == alpha * 0.5


def test_explicit_alpha_safe_is_kept():
    assert SteeringParams(alpha=0.4, alpha_safe=0.0).alpha_safe == 0.0
    assert SteeringParams(alpha=0.4, alpha_safe=0.7).alpha_safe == 0.7


BAD_FIELDS = [
    ("alpha", -0.1, ValueError),
    ("alpha", math.nan, ValueError),
    ("alpha", math.inf, ValueError),
    ("alpha", True, TypeError),
    ("alpha_safe", -1.0, ValueError),
    ("alpha_safe", math.nan, ValueError),
    ("alpha_safe", "0.1", TypeError),
    ("real_weight", 0.0, ValueError),
    ("real_weight", -1.0, ValueError),
    ("real_weight", math.inf, ValueError),
    ("plausibility", -0.1, ValueError),
    ("plausibility", 1.5, ValueError),
    ("plausibility", math.nan, ValueError),
    ("sensitive_top_k", -1, ValueError),
    ("sensitive_top_k", 2.0, TypeError),
    ("sensitive_top_k", True, TypeError),
    ("top_k", -3, ValueError),
    ("top_k", 1.5, TypeError),
    ("top_k", None, TypeError),
    ("scope", "top", ValueError),
    ("scope", None, ValueError),
    ("boost", math.inf, ValueError),
    ("boost", -math.inf, ValueError),
    ("boost", math.nan, ValueError),
    ("boost", "1", TypeError),
    ("suppress", math.nan, ValueError),
    ("suppress", -math.inf, ValueError),
    ("temperature", -0.5, ValueError),
    ("temperature", math.nan, ValueError),
    ("temperature", math.inf, ValueError),
    ("top_p", 0.0, ValueError),
    ("top_p", -0.5, ValueError),
    ("top_p", 1.01, ValueError),
    ("top_p", math.nan, ValueError),
]


@pytest.mark.parametrize("field,value,error", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_bad_field_raises_naming_it(field, value, error):
    with pytest.raises(error, match=field):
        SteeringParams(**{field: value})
    with pytest.raises(error, match=field):  # replace() validates again
        SteeringParams().replace(**{field: value})


def test_suppress_of_wrong_type_raises_naming_it():
    # suppress has its own check (it may be +inf); it raises ValueError, not TypeError.
    with pytest.raises((TypeError, ValueError), match="suppress"):
        SteeringParams(suppress="1")


@pytest.mark.parametrize("value", ["0.3", None])
def test_non_numeric_alpha_raises_naming_alpha(value):
    with pytest.raises(TypeError, match="alpha"):
        SteeringParams(alpha=value)


def test_replace_alpha_rederives_default_alpha_safe():
    assert SteeringParams().replace(alpha=0.6).alpha_safe == 0.3


def test_replace_with_alpha_safe_none_rederives():
    assert SteeringParams().replace(alpha=0.6, alpha_safe=None).alpha_safe == 0.3


@pytest.mark.parametrize(
    "good",
    [
        dict(top_p=1.0),
        dict(top_p=1e-6),
        dict(plausibility=1.0),
        dict(real_weight=1e-9),
        dict(sensitive_top_k=0),
        dict(top_k=0),
        dict(scope="all"),
        dict(boost=-2.0),
        dict(suppress=math.inf),
        dict(suppress=0.0),
        dict(temperature=0.7),
        dict(alpha=1),
    ],
)
def test_edge_values_are_accepted(good):
    SteeringParams(**good)


def test_frozen_and_replace():
    p = SteeringParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.alpha = 1.0
    q = p.replace(temperature=0.5, scope="all")
    assert (q.temperature, q.scope, q.is_greedy) == (0.5, "all", False)
    assert (p.temperature, p.scope) == (0.0, "sensitive")


def test_biases():
    p = SteeringParams(boost=2.0, suppress=0.5)
    assert (p.bias_unsafe, p.bias_safe) == (2.0, -0.5)
    assert SteeringParams(suppress=math.inf).bias_safe == -math.inf


# ----- presets: the formulas of docs/design.md §1.5 ----------------------------------------


def contrast(p: SteeringParams, zr, zn, safe=False):
    """``w * zr - alpha_v * zn`` with the plausibility cutoff, from the params alone."""
    z = p.real_weight * zr - (p.alpha_safe if safe else p.alpha) * zn
    if p.plausibility > 0:
        z = z.masked_fill(zr < math.log(p.plausibility) + zr.max(), -math.inf)
    return z


def test_safecode_default_formula():
    zr, zn = torch.randn(2, 50, dtype=torch.float64)
    p = SteeringParams()
    torch.testing.assert_close(contrast(p, zr, zn), zr - 0.3 * zn)
    torch.testing.assert_close(contrast(p, zr, zn, safe=True), zr - 0.15 * zn)


@pytest.mark.parametrize("alpha,beta", [(1.0, 0.1), (0.5, 0.2), (2.0, 0.0)])
def test_vcd_preset(alpha, beta):
    p = SteeringParams.vcd(alpha=alpha, beta=beta)
    assert (p.real_weight, p.alpha, p.alpha_safe, p.plausibility) == (1 + alpha, alpha, alpha, beta)
    assert (p.bias_unsafe, p.bias_safe) == (0.0, 0.0)
    zr, zn = torch.randn(2, 50, dtype=torch.float64)
    expected = (1 + alpha) * zr - alpha * zn
    if beta > 0:
        expected[zr < math.log(beta) + zr.max()] = -math.inf
    for safe in (False, True):
        torch.testing.assert_close(contrast(p, zr, zn, safe), expected)


def test_vcd_defaults_and_overrides():
    p = SteeringParams.vcd()
    assert (p.alpha, p.plausibility, p.real_weight) == (1.0, 0.1, 2.0)
    q = SteeringParams.vcd(alpha=0.5, temperature=1.0, top_p=0.9)
    assert (q.temperature, q.top_p, q.real_weight) == (1.0, 0.9, 1.5)
    with pytest.raises(ValueError, match="plausibility"):
        SteeringParams.vcd(beta=2.0)


@pytest.mark.parametrize("g", [1.0, 1.5, 3.0])
def test_cfg_preset(g):
    p = SteeringParams.cfg(scale=g)
    assert (p.real_weight, p.alpha, p.alpha_safe) == (g, g - 1, g - 1)
    assert (p.bias_unsafe, p.bias_safe, p.plausibility) == (0.0, 0.0, 0.0)
    zr, zn = torch.randn(2, 50, dtype=torch.float64)
    for safe in (False, True):
        torch.testing.assert_close(contrast(p, zr, zn, safe), g * zr - (g - 1) * zn)


@pytest.mark.parametrize("g", [0.5, -1.0, math.nan, math.inf, "2"])
def test_cfg_bad_scale(g):
    with pytest.raises(ValueError, match="scale"):
        SteeringParams.cfg(scale=g)


def test_cfg_overrides():
    assert SteeringParams.cfg(2.0, boost=1.0).bias_unsafe == 1.0


# ----- probability-space weights ------------------------------------------------------------


def test_probability_weights_to_logit_biases():
    assert probability_weights_to_logit_biases(1.0, 0.5) == (math.log(2.0), math.log(2.0))
    assert probability_weights_to_logit_biases(0.0, 0.0) == (0.0, 0.0)
    boost, suppress = probability_weights_to_logit_biases(0.3, 0.3)
    assert boost == math.log1p(0.3) and suppress == -math.log1p(-0.3)
    assert math.isclose(math.exp(boost), 1.3) and math.isclose(math.exp(-suppress), 0.7)


@pytest.mark.parametrize("gamma", [1.0, 1.5, math.inf])
def test_gamma_at_least_one_bans(gamma):
    assert probability_weights_to_logit_biases(0.0, gamma)[1] == math.inf


@pytest.mark.parametrize(
    "beta,gamma,name",
    [
        (-0.1, 0.0, "boost_weight"),
        (math.inf, 0.0, "boost_weight"),
        (math.nan, 0.0, "boost_weight"),
        (0.0, -0.1, "suppress_weight"),
        (0.0, math.nan, "suppress_weight"),
    ],
)
def test_bad_probability_weights(beta, gamma, name):
    with pytest.raises(ValueError, match=name):
        probability_weights_to_logit_biases(beta, gamma)
    with pytest.raises(ValueError, match=name):
        SteeringParams.with_probability_weights(beta, gamma)


def test_with_probability_weights():
    p = SteeringParams.with_probability_weights(0.3, 0.3)
    assert p.bias_unsafe == math.log1p(0.3) and p.bias_safe == math.log1p(-0.3)
    assert p.alpha == 0.3 and p.sensitive_top_k == 20  # the rest stay default
    q = SteeringParams.with_probability_weights(1.0, 1.0, alpha=0.5, scope="all")
    assert (q.alpha, q.alpha_safe, q.scope, q.bias_safe) == (0.5, 0.25, "all", -math.inf)


def reweight(logits, mask, factor):
    """The released code's probability-space step: ``p[r] * factor`` on R, then renormalise."""
    p = torch.softmax(logits, dim=-1)
    p = torch.where(mask, p * factor, p)
    return p / p.sum(dim=-1, keepdim=True)


@settings(max_examples=40, deadline=None)
@given(
    beta=st.floats(0.0, 20.0),
    gamma=st.floats(0.0, 0.999),
    seed=st.integers(0, 2**31 - 1),
)
def test_additive_bias_equals_probability_reweighting(beta, gamma, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(4, 64, generator=gen, dtype=torch.float64)
    mask = torch.rand(64, generator=gen) < 0.2
    p = SteeringParams.with_probability_weights(beta, gamma)
    unsafe = torch.softmax(logits + p.bias_unsafe * mask, dim=-1)
    safe = torch.softmax(logits + p.bias_safe * mask, dim=-1)
    torch.testing.assert_close(unsafe, reweight(logits, mask, 1 + beta))
    torch.testing.assert_close(safe, reweight(logits, mask, 1 - gamma))


def test_gamma_one_removes_all_refusal_mass():
    logits = torch.randn(3, 32, dtype=torch.float64)
    mask = torch.zeros(32, dtype=torch.bool)
    mask[[1, 5, 9]] = True
    p = SteeringParams.with_probability_weights(0.0, 1.0)
    # where(), not bias * mask: -inf * False is NaN.
    safe = torch.softmax(logits + torch.where(mask, p.bias_safe, 0.0), dim=-1)
    assert bool((safe[:, mask] == 0).all())
    torch.testing.assert_close(safe, reweight(logits, mask, 0.0))
