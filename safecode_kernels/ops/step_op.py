"""``safecode_kernels::step``: the step op registered with PyTorch, so that ``torch.compile``
sees one opaque op (no graph break, one event in profiles), as FlashInfer registers its
samplers.

The op takes tensors and plain scalars only::

    torch.ops.safecode_kernels.step(
        logits_real,      # [B, V] fp32/fp16/bf16
        logits_noised,    # [B, V] same dtype and device
        verdict,          # [B] integer tensor: codes.Verdict (+1 unsafe, -1 safe, 0 none)
        refusal,          # sorted unique int64 ids, or a bool mask [V]
        alpha, alpha_safe, real_weight, plausibility,   # float: SteeringParams' fields
        sensitive_top_k,  # int
        scope,            # int: codes.Scope (0 sensitive, 1 all)
        boost, suppress, temperature,                   # float (suppress may be inf)
        top_k,            # int
        top_p,            # float
        seed,             # int >= 0, or -1: draw one from torch's default generator (sampling only)
        backend,          # str: "auto" | "torch" | "cpu" | "triton"
        return_logits, return_stats,                    # bool
    ) -> (tokens [B] int64, logits [B, V] fp32 or [0], refusal_mass [2, B] fp32 or [0])

It checks its inputs exactly as :func:`~safecode_kernels.safecode_step` does and raises the
same errors. ``refusal_mass`` stacks ``(before, after)``; the outputs that were not asked for
are empty. The op has no gradient (its result is a discrete choice).

:func:`~safecode_kernels.safecode_step` keeps its Python signature (lists, a
:class:`RefusalVocabulary`, generators...): under ``torch.compile`` it converts them and calls
this op; in eager mode it calls the same implementation directly, which saves the ~40 us that
a trip through the dispatcher costs, and is still one event (``record_function``) in profiles.
"""

from __future__ import annotations

import functools

import torch

from ..params import SteeringParams
from .codes import Scope
from .dispatch import resolve_backend
from .step_inputs import check_verdict_values, fast_step_inputs, prepare_step_inputs

OP_NAME = "safecode_kernels::step"

SCHEMA = (
    "(Tensor logits_real, Tensor logits_noised, Tensor verdict, Tensor refusal, "
    "float alpha, float alpha_safe, float real_weight, float plausibility, int sensitive_top_k, int scope, "
    "float boost, float suppress, float temperature, int top_k, float top_p, "
    "int seed, str backend, bool return_logits, bool return_stats) -> (Tensor, Tensor, Tensor)"
)

# The largest value an ``int`` argument of the op takes; a larger k means the same as V.
_INT64_MAX = 2**63 - 1


def run_step(logits_real, logits_noised, verdict, refusal, params, generator, backend, return_logits, return_stats):
    """Check the inputs, pick the backend and run it: ``(tokens, logits | None, (before, after) | None)``.

    What the op and the eager path of ``safecode_step`` both run. A decoder's usual call takes
    the fast path (:func:`fast_step_inputs`: no tensor created or converted before the kernel
    runs); any other input is checked fully."""
    inputs = fast_step_inputs(logits_real, logits_noised, verdict, refusal, params, generator)
    if inputs is None:
        inputs = prepare_step_inputs(logits_real, logits_noised, verdict, refusal, params, generator)
        return resolve_backend(backend, inputs.logits_real.device)(inputs, return_logits, return_stats)
    run = resolve_backend(backend, logits_real.device)
    if not getattr(run, "checks_verdict_values", False):
        check_verdict_values(inputs.verdict)
    return run(inputs, return_logits, return_stats)


def op_scalars(params: SteeringParams) -> tuple:
    """The op's scalar arguments ``alpha .. top_p`` for ``params``."""
    return (
        float(params.alpha),
        float(params.alpha_safe),
        float(params.real_weight),
        float(params.plausibility),
        min(int(params.sensitive_top_k), _INT64_MAX),
        int(Scope.ALL if params.scope == "all" else Scope.SENSITIVE),
        float(params.boost),
        float(params.suppress),
        float(params.temperature),
        min(int(params.top_k), _INT64_MAX),
        float(params.top_p),
    )


@functools.lru_cache(maxsize=256)
def _params(
    alpha, alpha_safe, real_weight, plausibility, sensitive_top_k, scope, boost, suppress, temperature, top_k, top_p
) -> SteeringParams:
    # Cached: SteeringParams validates every field, which would cost more than a small step.
    return SteeringParams(
        alpha=alpha,
        alpha_safe=alpha_safe,
        real_weight=real_weight,
        plausibility=plausibility,
        sensitive_top_k=sensitive_top_k,
        scope=Scope(scope).name.lower(),
        boost=boost,
        suppress=suppress,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )


@torch.library.custom_op(OP_NAME, mutates_args=(), schema=SCHEMA)
def step_op(
    logits_real,
    logits_noised,
    verdict,
    refusal,
    alpha,
    alpha_safe,
    real_weight,
    plausibility,
    sensitive_top_k,
    scope,
    boost,
    suppress,
    temperature,
    top_k,
    top_p,
    seed,
    backend,
    return_logits,
    return_stats,
):
    params = _params(
        alpha, alpha_safe, real_weight, plausibility, sensitive_top_k, scope, boost, suppress, temperature, top_k, top_p
    )
    tokens, logits, stats = run_step(
        logits_real,
        logits_noised,
        verdict,
        refusal,
        params,
        None if seed < 0 else seed,
        backend,
        return_logits,
        return_stats,
    )
    # Outputs may not alias each other: a placeholder each, and the two masses stacked (not views).
    if logits is None:
        logits = logits_real.new_empty(0, dtype=torch.float32)
    mass = logits_real.new_empty(0, dtype=torch.float32) if stats is None else torch.stack(stats)
    return tokens, logits, mass


@step_op.register_fake
def _(
    logits_real,
    logits_noised,
    verdict,
    refusal,
    alpha,
    alpha_safe,
    real_weight,
    plausibility,
    sensitive_top_k,
    scope,
    boost,
    suppress,
    temperature,
    top_k,
    top_p,
    seed,
    backend,
    return_logits,
    return_stats,
):
    batch, vocab = logits_real.shape
    f32 = torch.float32
    return (
        logits_real.new_empty(batch, dtype=torch.int64),
        logits_real.new_empty((batch, vocab) if return_logits else (0,), dtype=f32),
        logits_real.new_empty((2, batch) if return_stats else (0,), dtype=f32),
    )


def _setup_context(ctx, inputs, output):
    # A sampled or argmax token has no gradient; nor do the logits and masses here (the op
    # is a decoding step). Saying so lets torch.compile trace it with inputs that need grad.
    ctx.mark_non_differentiable(*output)


def _backward(ctx, *grads):
    return (None,) * len(torch.ops.safecode_kernels.step.default._schema.arguments)


step_op.register_autograd(_backward, setup_context=_setup_context)
