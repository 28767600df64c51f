"""The ``triton`` backend of the step op (SPEC §2): the launcher of the fused kernels.

The kernels live in :mod:`.step_triton_kernels`; this module picks block sizes (heuristics
by V and B; no autotuning), carves the small partial-result buffers out of one allocation
per dtype, launches the kernels, and reads the per-row status word: the one host-device
sync of a step (it turns problems into the reference's :class:`StepError`).

How exact it is, against :mod:`.step_torch`:

* Contrast, plausibility cutoff, bias and the written logits: the same fp32 operations in
  the same order (floating-point contraction disabled), so they are bitwise equal.
* Greedy tokens: exact (argmax over the non-refusal tokens per block, merged with the
  refusal tokens recomputed from their ids; lowest index on ties).
* Sensitive set: exact. Each block sends its top-``k`` candidates (radix select on the
  float's ordered bits and the index, ties to the lower index) and the merge takes the
  k-th largest of candidates + refusal tokens. A block can send at most ``MAX_MERGE_LANES /
  n_blocks`` candidates; for a larger k the merge checks whether the candidates decided
  the row, and rows they did not are recomputed (fallback below).
* Refusal mass before/after: the same sums in another order (float rounding only).
* Sampling with temperature only: Gumbel-max with counter-based Philox noise, exact in
  distribution up to the noise's 24-bit uniform grid (tail mass ~6e-8 clipped).
* Top-k / top-p: the kept set is computed from the candidates (top-p without top-k: each
  block sends enough of them to fill ``TOP_P_LANES`` lanes per row), sorted in the merge,
  then Gumbel-max over the kept set. It is exact whenever the candidates reach far enough
  down the ranking, which the merge checks; a row whose nucleus reaches further (a very
  flat distribution) or whose top-k exceeds the candidates is flagged, and the launcher
  recomputes it with the torch reference (same distribution; those rows cost a second
  pass). The top-p boundary uses a parallel prefix sum: it can differ from the reference's
  only where a cumulative mass equals ``top_p`` to within float rounding.
* Ranking for top-k/top-p uses ``z'`` rather than ``z' / T``; they differ only where the
  division rounds two different logits to one value (equal probabilities then).
* The same seed gives the same tokens (Philox counters are ``(row, token)``).

Memory traffic: every input logit is read exactly once, except that with
``plausibility > 0`` a first small kernel reads the real row once more for its max (the
cutoff must be known before any token is judged); the merge re-reads the few refusal
logits by id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys

import torch

from .step_inputs import StepInputs, raise_for_row_status

# The merge kernel's per-row word: a status code of step_inputs.ROW_PROBLEMS in the low
# byte, and this flag for rows the candidates could not decide (recomputed exactly).
FALLBACK_FLAG = 256

# Lanes of the merge kernel (candidates of all blocks + refusal tokens): what top-p without
# top-k fills (it sorts them), and the most any configuration may use (larger k are decided
# by the merge or fall back). MAX_BLOCK bounds a block kernel's tile (registers).
TOP_P_LANES = 4096
MAX_MERGE_LANES = 8192
MAX_BLOCK = 8192

# Tests set this to split small vocabularies over several blocks (0: the heuristics decide).
_FORCE_BLOCK = 0


def _interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter: TRITON_INTERPRET=1 when they are
    defined (on first use; a status query does not define them)."""
    kernels = sys.modules.get(f"{__package__}.step_triton_kernels")
    if kernels is None:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernels.step_block_kernel, InterpretedFunction)


def unavailable_reason(device=None) -> str | None:
    """``None`` when the Triton backend can run on ``device`` (on some device when ``None``),
    else why not. CPU tensors run only in Triton's interpreter (``TRITON_INTERPRET=1`` set
    before the kernels are imported: slow, for tests); ``auto`` never picks this backend for
    them."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        return f"triton is not installed ({exc})"
    interpreted = _interpreted()
    if device is None:
        if interpreted or torch.cuda.is_available():
            return None
        return "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU tensors, slowly)"
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "CUDA is not available"
    if device.type == "cpu":
        if interpreted:
            return None
        return ("it needs CUDA tensors (CPU tensors only in Triton's interpreter: set "
                "TRITON_INTERPRET=1 before the first Triton step, for tests)")
    return f"it does not support {device.type} tensors"


# ----------------------------------------------------------------------------------------
# Launch plan
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Plan:
    block: int  # tokens per program of the block kernel
    n_blocks: int
    block_warps: int
    merge_warps: int
    k_cand: int  # candidates per block (0: none)
    c_pad: int
    x_pad: int  # lanes of the merge kernel: candidate slots + refusal tokens
    idx_bits: int
    sens: int  # 0 none, 1 every token, 2 top-k_sens
    greedy: bool
    gumbel: bool
    top_k: bool
    top_p: bool


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _plan(inp: StepInputs) -> _Plan:
    p = inp.params
    batch, vocab = inp.batch, inp.vocab
    greedy = p.is_greedy
    if p.scope == "all" or p.sensitive_top_k >= vocab:
        sens = 1
    elif p.sensitive_top_k == 0:
        sens = 0
    else:
        sens = 2
    top_k = not greedy and 0 < p.top_k < vocab
    top_p = not greedy and p.top_p < 1.0
    gumbel = not greedy and not (top_k or top_p)

    # Candidates each block must send: the sensitive set's k and sampling's top_k; for top-p
    # alone, as many as fill the merge's TOP_P_LANES lanes (see below).
    need = max(p.sensitive_top_k if sens == 2 else 0, p.top_k if top_k else 0)
    nucleus = top_p and not top_k
    n_ref = inp.refusal_ids.numel()

    if _FORCE_BLOCK:
        block = _FORCE_BLOCK
    elif _interpreted():
        # The interpreter pays per program and per op, not per element: few large blocks.
        block = min(4096, _next_pow2(vocab))
    else:
        # Enough programs to fill the GPU at small batches (a row is split over blocks), but
        # not so many blocks that the merge's candidate list gets long.
        block = 8192 if need == 0 and not nucleus else 4096
        while block > 1024 and batch * math.ceil(vocab / block) < 2 * _sm_count(inp.logits_real.device):
            block //= 2
        while block < MAX_BLOCK and math.ceil(vocab / block) * _next_pow2(need) > TOP_P_LANES:
            block *= 2
        block = min(block, _next_pow2(vocab))
    block = max(block, 16)
    n_blocks = math.ceil(vocab / block)

    k_cand = need
    if nucleus:
        room = max(1, (TOP_P_LANES - n_ref) // n_blocks)
        k_cand = max(k_cand, 1 << (room.bit_length() - 1))  # a power of two: no padding
    if k_cand:
        # Never more than a block holds, nor more lanes than the merge takes: with a larger
        # k the merge detects the rows the candidates cannot decide (they fall back).
        k_cand = min(k_cand, block, max(1, (MAX_MERGE_LANES - n_ref) // n_blocks))
    c_pad = _next_pow2(k_cand) if k_cand else 1
    cand_slots = n_blocks * c_pad if k_cand else 0
    x_pad = max(16, _next_pow2(cand_slots + n_ref))
    return _Plan(
        block=block,
        n_blocks=n_blocks,
        block_warps=max(4, min(16, block // 256)),  # 8 tokens per thread
        merge_warps=4 if x_pad <= 1024 else (8 if x_pad <= 2048 else 16),
        k_cand=k_cand,
        c_pad=c_pad,
        x_pad=x_pad,
        idx_bits=max(1, (vocab - 1).bit_length()),
        sens=sens,
        greedy=greedy,
        gumbel=gumbel,
        top_k=top_k,
        top_p=top_p,
    )


# ----------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------
def step_triton(inp: StepInputs, return_logits: bool, return_stats: bool):
    """Returns ``(tokens [B] int64, logits [B, V] fp32 | None, (before, after) | None)``."""
    from . import step_triton_kernels as kernels

    p = inp.params
    plan = _plan(inp)
    batch, vocab = inp.batch, inp.vocab
    zr, zn = inp.logits_real, inp.logits_noised
    device = zr.device
    plaus = p.plausibility > 0.0
    cands = plan.k_cand > 0
    usum = plan.top_p and not plan.top_k
    f32, i32, i64 = torch.float32, torch.int32, torch.int64
    parts = (batch, plan.n_blocks)
    cand_shape = (batch, plan.n_blocks, plan.c_pad)
    w = _scratch(device, {
        # name: (shape or None when this step does not use it, dtype)
        "rowmax": (parts if plaus else None, f32),
        "block_flags": (parts, i32),
        "best_val": (parts if plan.greedy else None, f32),
        "best_idx": (parts if plan.greedy else None, i32),
        "zmax": (parts if return_stats else None, f32),
        "zsum": (parts if return_stats else None, f32),
        "gumbel_val": (parts if plan.gumbel else None, f32),
        "gumbel_idx": (parts if plan.gumbel else None, i32),
        "umax": (parts if usum else None, f32),
        "usum": (parts if usum else None, f32),
        "cand_val": (cand_shape if cands else None, f32),
        "cand_idx": (cand_shape if cands else None, i32),
        "cand_count": (parts if cands else None, i32),
        "tail": (parts if cands else None, i64),
        "status": ((batch,), i32),
    })
    tokens = torch.empty(batch, dtype=i64, device=device)
    out = torch.empty((batch, vocab) if return_logits else (1, 1), dtype=f32, device=device)
    mass = torch.empty((2, batch) if return_stats else (2, 1), dtype=f32, device=device)

    refmask = inp.refusal_mask.view(torch.uint8)
    n_ref = inp.refusal_ids.numel()
    ref_ids = inp.refusal_ids if n_ref else torch.zeros(1, dtype=i64, device=device)
    # Offset into [2**62, 2**63) so that the seed is always an int64 argument (one compiled
    # variant); distinct seeds stay distinct Philox keys.
    seed = (inp.seed or 0) + (1 << 62)
    temperature = float(p.temperature) if p.temperature > 0 else 1.0
    log_beta = math.log(p.plausibility) if plaus else 0.0
    nb_pad = max(2, _next_pow2(plan.n_blocks))
    # Contraction into FMAs would change the rounding of w*zr - a*zn against torch.
    launch = dict(enable_fp_fusion=False)
    contrast = (float(p.real_weight), float(p.alpha), float(p.alpha_safe), log_beta)

    grid = (plan.n_blocks, batch)
    with _on(device):
        if plaus:
            kernels.row_max_kernel[grid](zr, zr.stride(0), w["rowmax"], vocab, plan.n_blocks,
                                         BLOCK=plan.block, num_warps=plan.block_warps)
        kernels.step_block_kernel[grid](
            zr, zn, zr.stride(0), zn.stride(0), inp.verdict, refmask, w["rowmax"],
            out, out.stride(0),
            w["block_flags"], w["best_val"], w["best_idx"], w["zmax"], w["zsum"],
            w["gumbel_val"], w["gumbel_idx"], w["umax"], w["usum"],
            w["cand_val"], w["cand_idx"], w["cand_count"], w["tail"],
            vocab, plan.n_blocks, int(plaus), *contrast, temperature, seed, plan.k_cand, plan.idx_bits,
            BLOCK=plan.block, NB_PAD=nb_pad, C_PAD=plan.c_pad,
            WRITE_LOGITS=bool(return_logits), ARGMAX=plan.greedy, SUMEXP=bool(return_stats),
            GUMBEL=plan.gumbel, USUM=usum, CANDS=cands,
            num_warps=plan.block_warps, **launch,
        )
        kernels.step_merge_kernel[(batch,)](
            zr, zn, zr.stride(0), zn.stride(0), inp.verdict, ref_ids, n_ref, w["rowmax"],
            out, out.stride(0),
            w["block_flags"], w["best_val"], w["best_idx"], w["zmax"], w["zsum"],
            w["gumbel_val"], w["gumbel_idx"], w["umax"], w["usum"],
            w["cand_val"], w["cand_idx"], w["cand_count"], w["tail"],
            tokens, mass[0], mass[1], w["status"],
            vocab, plan.n_blocks, int(plaus), *contrast, p.bias_unsafe, p.bias_safe, temperature,
            float(p.top_p), seed, plan.sens, min(p.sensitive_top_k, vocab), min(p.top_k, vocab), plan.idx_bits,
            NB_PAD=nb_pad, X_PAD=plan.x_pad, C_PAD=plan.c_pad,
            WRITE_LOGITS=bool(return_logits), STATS=bool(return_stats), GREEDY=plan.greedy,
            GUMBEL=plan.gumbel, CANDS=cands, TOPK=plan.top_k, TOPP=plan.top_p,
            num_warps=plan.merge_warps, **launch,
        )

    logits = out if return_logits else None
    stats = (mass[0], mass[1]) if return_stats else None
    # The one host-device sync of the step: the per-row status words (errors, fallback rows).
    words = w["status"].cpu()
    if bool(words.any()):
        raise_for_row_status(words & (FALLBACK_FLAG - 1))
        fallback = (words & FALLBACK_FLAG).nonzero().flatten()
        if fallback.numel():
            tokens, logits, stats = _fallback_rows(inp, fallback.to(device), tokens, logits, stats,
                                                   return_logits, return_stats)
    return tokens, logits, stats


def _on(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _scratch(device, specs) -> dict[str, torch.Tensor]:
    """The step's scratch buffers, ``{name: (shape | None, dtype)}``, carved from one
    allocation per dtype (a dozen allocations would cost more than the kernels). Each
    starts 64-byte aligned; an unused one is a small stand-in that the kernels never touch
    (the pointer keeps the dtype the kernels are compiled for)."""
    groups: dict[torch.dtype, list] = {}
    for name, (shape, dtype) in specs.items():
        groups.setdefault(dtype, []).append((name, shape or (1,)))
    views = {}
    for dtype, items in groups.items():
        per_64_bytes = 64 // torch.empty((), dtype=dtype).element_size()
        sizes = [-(-math.prod(shape) // per_64_bytes) * per_64_bytes for _, shape in items]
        storage = torch.empty(sum(sizes), dtype=dtype, device=device)
        offset = 0
        for (name, shape), size in zip(items, sizes):
            views[name] = storage[offset:offset + math.prod(shape)].view(shape)
            offset += size
    return views


def _fallback_rows(inp, rows, tokens, logits, stats, return_logits, return_stats):
    """Recompute rows the candidates could not decide exactly with the torch reference
    (rare: a nucleus wider than the candidate slots, or a huge sensitive/top-k)."""
    from .step_torch import step_torch

    sub = dataclasses.replace(
        inp,
        logits_real=inp.logits_real.index_select(0, rows),
        logits_noised=inp.logits_noised.index_select(0, rows),
        verdict=inp.verdict.index_select(0, rows),
    )
    sub_tokens, sub_logits, sub_stats = step_torch(sub, return_logits, return_stats)
    tokens = tokens.index_copy(0, rows, sub_tokens)
    if return_logits:
        logits = logits.index_copy(0, rows, sub_logits)
    if return_stats:
        stats = tuple(s.index_copy(0, rows, t) for s, t in zip(stats, sub_stats))
    return tokens, logits, stats
