"""The ``triton`` backend of the step op (docs/design.md §2): the launcher of the fused kernels.

The kernels live in :mod:`.step_triton_kernels`; this module picks block sizes (heuristics
by V; no autotuning), carves the small partial-result buffers out of one allocation
per dtype, launches the kernels, and reads the per-row status word: the one host-device
sync of a step (it turns problems into the reference's :class:`StepError`).

How exact it is, against :mod:`.step_torch`:

* Contrast, plausibility cutoff, bias and the written logits: the same fp32 operations in
  the same order (floating-point contraction disabled), so they are bitwise equal.
* Refusal tokens, any number up to V: each block handles those it holds, from the refusal
  mask; no kernel's shape, registers or compile time depends on the refusal set. With scope
  "all" or ``sensitive_top_k >= V`` (or 0: no bias) every refusal token's bias is known
  before the merge, and the blocks apply it. With the
  sensitive top-k set only the refusal tokens among a block's candidates can be in it: those
  are *pending*, left to the merge, and every other refusal token is unbiased.
* Greedy tokens: exact (argmax per block over every token but the pending ones, merged with
  the pending ones after their bias; lowest index on ties).
* Sensitive set: exact. Each block sends its top-``k`` candidates over all its tokens (radix
  select on the float's ordered bits and the index, ties to the lower index) and the merge
  takes the k-th largest candidate. A block can send at most ``MAX_MERGE_LANES / n_blocks``
  candidates; for a larger k the merge checks whether the candidates decided the row, and
  rows they did not are recomputed (fallback below).
* Refusal mass before/after: the same sums in another order (float rounding only).
* Sampling scales ``(z' - max z') / T`` as the reference does, never ``z' / T`` (huge finite
  logits over a small T would overflow): each block shifts by its own max, the merge
  rescales to the row's. A temperature whose float32 inverse overflows decodes greedily
  (``step_torch.decodes_greedily``), on every backend.
* Sampling with temperature only: Gumbel-max with counter-based Philox noise, exact in
  distribution up to the noise's 24-bit uniform grid (tail mass ~6e-8 clipped).
* Top-k / top-p: the kept set is computed from the candidates (top-p without top-k: each
  block sends enough of them to fill ``TOP_P_LANES`` lanes per row), then Gumbel-max over
  the kept set. It is exact whenever the candidates reach far enough
  down the ranking, which the merge checks; a row whose nucleus reaches further (a very
  flat distribution), whose top-k exceeds the candidates, or whose suppressed sensitive
  candidate leaves its top-k place to a token no block sent is flagged, and the launcher
  recomputes it with the torch reference (same distribution; those rows cost a second
  pass). The top-p boundary is a radix search for the lowest key whose mass above is below
  ``top_p`` (no sort; sums in another order than the reference's cumsum): it can differ
  from the reference's only where a cumulative mass equals ``top_p`` to within float
  rounding.
* Ranking for top-k/top-p uses ``z'`` rather than ``z' / T``; they differ only where the
  division rounds two different logits to one value (equal probabilities then).
* The same seed gives the same tokens (Philox counters are ``(row, token)``).

Memory traffic: every input logit is read exactly once, except that with
``plausibility > 0`` a first small kernel reads the real row once more for its max (the
cutoff must be known before any token is judged); the block kernel reads the refusal mask
(one byte per token), and the merge reads only the partials and candidates.

Compiled variants: few by design (:func:`kernel_variants`, every one compiled for sm_80 and
sm_90 by tests/ops/test_triton_compile.py): one block size on a GPU, runtime switches
rather than constexprs wherever registers allow, and a merge that never reads the logits
(any dtype), compiled for ``X_SIZES`` lanes only. The plan depends on V and the parameters
only (never on the batch or the refusal set). A step the kernels cannot take (more than
``NB_MAX`` blocks, i.e. V > 524288) runs the torch reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys

import torch

from .codes import FALLBACK_FLAG, STATUS_MASK, SensitiveSet, sensitive_set
from .step_inputs import StepInputs, raise_for_row_status
from .step_torch import decodes_greedily, step_torch

# Lanes of the merge kernel (the candidates of all blocks): what top-p without
# top-k fills, and the most any configuration may use (larger k are decided by the merge or
# fall back). The merge is compiled for X_SIZES lanes only (a few variants, see
# kernel_variants); MAX_BLOCK bounds a block kernel's tile (registers).
TOP_P_LANES = 2048
MAX_MERGE_LANES = 4096
X_SIZES = (256, 1024, 4096)
MAX_BLOCK = 8192
# The block size on a GPU (8 warps, 8 tokens per thread): one size, because every size is
# a set of compiled variants, and this one both keeps a batch of one row on dozens of
# multiprocessors and the merge's candidate lists short (75 blocks for V = 152064).
GPU_BLOCK = 2048
# Most vocabulary blocks per row (step_triton_kernels.NB_MAX: the width of the partials' loads).
NB_MAX = 256
# Logits dtypes the block kernels are compiled for (the merge never reads the logits).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tests set this to split small vocabularies over several blocks (0: the heuristics decide).
_FORCE_BLOCK = 0


def _interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter: TRITON_INTERPRET=1 when they are
    defined (on first use; a status query does not define them)."""
    kernels = sys.modules.get(f"{__package__}.step_triton_kernels")
    if kernels is None:
        try:
            from triton import knobs
        except ImportError:  # triton < 3.4 reads the variable itself
            return os.environ.get("TRITON_INTERPRET", "0") == "1"
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
        return (
            "it needs CUDA tensors (CPU tensors only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 before the first Triton step, for tests)"
        )
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
    c_shift: int  # log2 of the candidate slots per block
    x_pad: int  # lanes of the merge kernel: the candidate slots (one of X_SIZES)
    idx_bits: int
    sens: SensitiveSet  # which refusal tokens get the bias
    greedy: bool
    gumbel: bool
    top_k: bool
    top_p: bool
    fits: bool  # False: the kernels cannot take this step (V > NB_MAX blocks: the torch reference runs it)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _plan(inp: StepInputs) -> _Plan:
    return plan(inp.vocab, inp.params, _interpreted())


def plan(vocab: int, p, interpreted: bool = False) -> _Plan:
    """The launch plan of a step over rows of ``vocab`` logits with
    :class:`~safecode_kernels.SteeringParams` ``p``. Neither the batch size nor the refusal
    set plays a part (the blocks handle the refusal tokens they hold, from the mask). Every
    compiled kernel a plan can lead to is in :func:`kernel_variants` (tests check it)."""
    greedy = decodes_greedily(p)
    sens = sensitive_set(p.scope, p.sensitive_top_k, vocab)
    top_k = not greedy and 0 < p.top_k < vocab
    top_p = not greedy and p.top_p < 1.0
    gumbel = not greedy and not (top_k or top_p)

    # Candidates each block must send: the sensitive set's k and sampling's top_k; for top-p
    # alone, as many as fill the merge's TOP_P_LANES lanes (see below).
    need = max(p.sensitive_top_k if sens == SensitiveSet.TOP_K else 0, p.top_k if top_k else 0)
    nucleus = top_p and not top_k

    if _FORCE_BLOCK:
        block = _FORCE_BLOCK
    elif interpreted:
        # The interpreter pays per program and per op, not per element: few large blocks.
        block = max(16, min(4096, _next_pow2(vocab)))
    else:
        block = GPU_BLOCK
    while math.ceil(vocab / block) > NB_MAX and block < MAX_BLOCK and (interpreted or _FORCE_BLOCK):
        block *= 2
    n_blocks = math.ceil(vocab / block)

    k_cand = need
    if nucleus:
        room = max(1, TOP_P_LANES // n_blocks)
        k_cand = max(k_cand, 1 << (room.bit_length() - 1))  # a power of two: no padding
    if k_cand:
        # Never more than a block holds, nor more lanes than the merge takes (a power of two:
        # the slots are padded to one): with a larger k the merge detects the rows the
        # candidates cannot decide (they fall back).
        room = max(1, MAX_MERGE_LANES // n_blocks)
        k_cand = min(k_cand, block, 1 << (room.bit_length() - 1))
    c_pad = _next_pow2(k_cand) if k_cand else 1
    lanes = n_blocks * c_pad if k_cand else 0
    x_pad = next((size for size in X_SIZES if size >= lanes), X_SIZES[-1])
    return _Plan(
        block=block,
        n_blocks=n_blocks,
        block_warps=_block_warps(block),
        merge_warps=_merge_warps(x_pad),
        k_cand=k_cand,
        c_shift=c_pad.bit_length() - 1,
        x_pad=x_pad,
        idx_bits=max(1, (vocab - 1).bit_length()),
        sens=sens,
        greedy=greedy,
        gumbel=gumbel,
        top_k=top_k,
        top_p=top_p,
        fits=n_blocks <= NB_MAX,
    )


def _block_warps(block: int) -> int:
    return max(4, min(16, block // 256))  # 8 tokens per thread


def _merge_warps(x_pad: int) -> int:
    return 4 if x_pad <= 1024 else (8 if x_pad <= 2048 else 16)


# ----------------------------------------------------------------------------------------
# The compiled variants
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class KernelVariant:
    """One compiled kernel: ``step_triton_kernels.<kernel>`` with these constexprs, for logits
    of ``dtype`` (None: the merge, which never reads the logits)."""

    kernel: str
    dtype: torch.dtype | None
    constexprs: tuple  # ((name, value), ...)
    num_warps: int
    enable_fp_fusion: bool

    @property
    def name(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.") if self.dtype is not None else "any-dtype"
        flags = "-".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.constexprs)
        return f"{self.kernel}[{dtype},{flags},w{self.num_warps}]"


# The kernels' tl.constexpr parameters (every other argument is a runtime value).
_CONSTEXPRS = ("BLOCK", "CANDS", "X_PAD")


def kernel_variants() -> list[KernelVariant]:
    """Every kernel the launcher can compile on a GPU, each once: the plan space of
    :func:`plan` (block size GPU_BLOCK, with or without candidates, merge lanes X_SIZES), for
    each dtype and both alignment twins. tests/ops/test_triton_compile.py compiles them all
    for sm_80 and sm_90."""
    warps = _block_warps(GPU_BLOCK)
    variants = []
    for dtype in DTYPES:
        for twin in ("", "_any"):
            variants.append(KernelVariant("row_max_kernel" + twin, dtype, (("BLOCK", GPU_BLOCK),), warps, True))
            for cands in (False, True):
                flags = (("BLOCK", GPU_BLOCK), ("CANDS", cands))
                variants.append(KernelVariant("step_block_kernel" + twin, dtype, flags, warps, False))
    for x_pad in X_SIZES:
        variants.append(KernelVariant("step_merge_kernel", None, (("X_PAD", x_pad),), _merge_warps(x_pad), False))
    return variants


def variant_of(launch: _Launch) -> KernelVariant:
    """The :class:`KernelVariant` a launch compiles (tests check it is in kernel_variants)."""
    constexprs = tuple((k, v) for k, v in launch.args.items() if k in _CONSTEXPRS)
    dtype = launch.args["zr_ptr"].dtype if launch.kernel != "step_merge_kernel" else None
    fusion = launch.options.get("enable_fp_fusion", True)
    return KernelVariant(launch.kernel, dtype, constexprs, launch.options["num_warps"], fusion)


# ----------------------------------------------------------------------------------------
# The op
# ----------------------------------------------------------------------------------------
def step_triton(inp: StepInputs, return_logits: bool, return_stats: bool, read_status: bool = True):
    """Returns ``(tokens [B] int64, logits [B, V] fp32 | None, (before, after) | None)``.

    ``read_status=False`` (for decoders, which read the status words with the step's tokens):
    no host sync here; returns ``(tokens, logits, stats, status)`` with ``status`` the ``[B]``
    int32 words (a ``RowStatus`` | ``FALLBACK_FLAG``), which :func:`.step_pending.finish_step` resolves."""
    from . import step_triton_kernels as kernels

    if not _plan(inp).fits:
        # More than NB_MAX blocks (V > 524288): the reference takes the step (exact, slower).
        return step_torch(inp, return_logits, return_stats, read_status)
    launches, tokens, out, mass, status = _launches(inp, return_logits, return_stats)
    with _on(inp.logits_real.device):
        for launch in launches:
            getattr(kernels, launch.kernel)[launch.grid](**launch.args, **launch.options)

    batch = inp.batch
    logits = out if return_logits else None
    stats = (mass[0, :batch], mass[1, :batch]) if return_stats else None
    if not read_status:
        return tokens, logits, stats, status
    # The one host-device sync of the step: the per-row status words (errors, fallback rows).
    words = status.cpu()
    if bool(words.any()):
        raise_for_row_status(words & STATUS_MASK)
        fallback = (words & FALLBACK_FLAG).nonzero().flatten()
        if fallback.numel():
            tokens, logits, stats = _fallback_rows(
                inp, fallback.to(status.device), tokens, logits, stats, return_logits, return_stats
            )
    return tokens, logits, stats


@dataclasses.dataclass(frozen=True)
class _Launch:
    """One kernel launch: ``step_triton_kernels.<kernel>[grid](**args, **options)``."""

    kernel: str
    grid: tuple[int, ...]
    args: dict  # every argument of the kernel, by name (constexprs included)
    options: dict  # num_warps and compiler options


def _aligned(*values) -> bool:
    """Whether tensors' addresses and ints are all divisible by 16 (what Triton specialises on)."""
    return all((v.data_ptr() if isinstance(v, torch.Tensor) else v) % 16 == 0 for v in values)


def _launches(inp: StepInputs, return_logits: bool, return_stats: bool):
    """The launches of one step and the buffers they write: ``(launches, tokens, out, mass,
    status)``. Nothing runs here: tests/ops/test_triton_compile.py checks that every launch
    compiles one of :func:`kernel_variants`."""
    p = inp.params
    plan = _plan(inp)
    batch, vocab = inp.batch, inp.vocab
    zr, zn = inp.logits_real, inp.logits_noised
    if max(zr.stride(0), zn.stride(0)) >= 2**31:  # keeps the strides i32 (one compiled variant)
        zr, zn = zr.contiguous(), zn.contiguous()
    device = zr.device
    plaus = p.plausibility > 0.0
    cands = plan.k_cand > 0
    usum = plan.top_p and not plan.top_k
    f32, i32, i64 = torch.float32, torch.int32, torch.int64
    parts = (batch, plan.n_blocks)
    cand_shape = (batch, plan.n_blocks, 1 << plan.c_shift)
    w = _scratch(
        device,
        {
            # name: (shape or None when this step does not use it, dtype)
            "rowmax": (parts if plaus else None, f32),
            "block_flags": (parts, i32),
            "best_val": (parts if plan.greedy else None, f32),
            "best_idx": (parts if plan.greedy else None, i32),
            "zmax": (parts if return_stats else None, f32),
            "zsum": (parts if return_stats else None, f32),
            "rmax": (parts if return_stats else None, f32),
            "rsum": (parts if return_stats else None, f32),
            "amax": (parts if return_stats else None, f32),
            "asum": (parts if return_stats else None, f32),
            "gumbel_val": (parts if plan.gumbel else None, f32),
            "gumbel_idx": (parts if plan.gumbel else None, i32),
            "umax": (parts if usum or plan.gumbel else None, f32),
            "usum": (parts if usum else None, f32),
            "cand_val": (cand_shape if cands else None, f32),
            "cand_idx": (cand_shape if cands else None, i32),
            "cand_count": (parts if cands else None, i32),
            "tail": (parts if cands else None, i64),
            "status": ((batch,), i32),
        },
    )
    tokens = torch.empty(batch, dtype=i64, device=device)
    out = torch.empty((batch, vocab) if return_logits else (1, 16), dtype=f32, device=device)
    # Rows of 16 floats: mass[1] stays 64-byte aligned whatever the batch.
    mass = torch.empty((2, -(-batch // 16) * 16 if return_stats else 16), dtype=f32, device=device)

    refmask = inp.refusal_mask.view(torch.uint8)
    if not _aligned(refmask):
        refmask = refmask.clone()
    # Offset into [2**62, 2**63) so that the seed is always an int64 argument (one compiled
    # variant); distinct seeds stay distinct Philox keys.
    seed = (inp.seed or 0) + (1 << 62)
    temperature = float(p.temperature) if p.temperature > 0 else 1.0
    stride_o = out.stride(0) if return_logits else 0
    # The aligned twins when every argument they specialise on is divisible by 16.
    twin = "" if _aligned(zr, zn, zr.stride(0), zn.stride(0), vocab, stride_o) else "_any"
    # Contraction into FMAs would change the rounding of w*zr - a*zn against torch.
    no_fma = dict(enable_fp_fusion=False)

    # Pointers: [B, V] logits rows have unit vocabulary stride and any row stride. Unused
    # scratch pointers are small stand-ins that the kernels never touch (see _scratch).
    # Partials are [B, NB] (NB = vocabulary blocks), candidates [B, NB, 2**c_shift].
    inputs = dict(
        zr_ptr=zr,  # [B, V] fp32/fp16/bf16: logits_real
        zn_ptr=zn,  # [B, V] same dtype: logits_noised
        stride_r=zr.stride(0),
        stride_n=zn.stride(0),
    )
    bias = dict(bias_unsafe=p.bias_unsafe, bias_safe=p.bias_safe, sens=int(plan.sens))
    contrast = dict(
        V=vocab,
        NB=plan.n_blocks,
        plaus=int(plaus),
        real_weight=float(p.real_weight),
        alpha=float(p.alpha),
        alpha_safe=float(p.alpha_safe),
        log_beta=math.log(p.plausibility) if plaus else 0.0,
    )
    partials = dict(
        flags_ptr=w["block_flags"],  # [B, NB] int32: BLOCK_* bits
        best_val_ptr=w["best_val"],  # [B, NB] fp32: greedy best z' but the pending tokens' (greedy)
        best_idx_ptr=w["best_idx"],  # [B, NB] int32: its token
        zmax_ptr=w["zmax"],  # [B, NB] fp32: max of z over non-refusal tokens (stats)
        zsum_ptr=w["zsum"],  # [B, NB] fp32: sum of exp(z - zmax)
        rmax_ptr=w["rmax"],  # [B, NB] fp32: max of z over refusal tokens, before the bias (stats)
        rsum_ptr=w["rsum"],  # [B, NB] fp32: sum of exp(z - rmax)
        amax_ptr=w["amax"],  # [B, NB] fp32: max of z' over refusal tokens but the pending ones (stats)
        asum_ptr=w["asum"],  # [B, NB] fp32: sum of exp(z' - amax)
        gumbel_val_ptr=w["gumbel_val"],  # [B, NB] fp32: Gumbel-max best of (z - umax) / T + g (gumbel)
        gumbel_idx_ptr=w["gumbel_idx"],  # [B, NB] int32: its token
        umax_ptr=w["umax"],  # [B, NB] fp32: max of z' (gumbel, usum: the shift of the block's scores)
        usum_ptr=w["usum"],  # [B, NB] fp32: sum of exp((z - umax) / T) (usum: top-p without top-k)
        cand_val_ptr=w["cand_val"],  # [B, NB, 2**c_shift] fp32: top-k_cand candidates' z' (pending: z) (CANDS)
        cand_idx_ptr=w["cand_idx"],  # [B, NB, 2**c_shift] int32: their tokens
        cand_count_ptr=w["cand_count"],  # [B, NB] int32: candidates sent per block
        tail_ptr=w["tail"],  # [B, NB] int64: rank key of the last kept candidate, or -1
    )
    grid = (batch, plan.n_blocks)
    launches = []
    if plaus:
        launches.append(
            _Launch(
                "row_max_kernel" + twin,
                grid,
                dict(
                    zr_ptr=zr,  # [B, V] fp32/fp16/bf16: logits_real
                    stride_r=zr.stride(0),
                    part_ptr=w["rowmax"],  # [B, NB] fp32 out: the block maxima
                    V=vocab,
                    NB=plan.n_blocks,
                    BLOCK=plan.block,
                ),
                dict(num_warps=plan.block_warps, enable_fp_fusion=True),
            )
        )
    launches.append(
        _Launch(
            "step_block_kernel" + twin,
            grid,
            dict(
                **inputs,
                verdict_ptr=inp.verdict,  # [B] int8: codes.Verdict
                refmask_ptr=refmask,  # [V] uint8: the refusal mask
                rowmax_ptr=w["rowmax"],  # [B, NB] fp32: row_max_kernel's maxima (read when plaus)
                out_ptr=out,  # [B, V] fp32 out: the modulated logits (write_logits), else [1, 16]
                stride_o=stride_o,
                **partials,
                **contrast,
                **bias,
                temperature=temperature,
                seed=seed,
                k_cand=plan.k_cand,
                c_shift=plan.c_shift,
                idx_bits=plan.idx_bits,
                write_logits=int(return_logits),
                sumexp=int(return_stats),
                argmax=int(plan.greedy),
                usum=int(usum),
                gumbel=int(plan.gumbel),
                BLOCK=plan.block,
                CANDS=cands,
            ),
            dict(num_warps=plan.block_warps, **no_fma),
        )
    )
    launches.append(
        _Launch(
            "step_merge_kernel",
            (batch,),
            dict(
                verdict_ptr=inp.verdict,  # [B] int8: codes.Verdict
                refmask_ptr=refmask,  # [V] uint8: the refusal mask (read at the candidates)
                out_ptr=out,  # [B, V] fp32 out: the biased pending tokens' logits (write_logits)
                stride_o=stride_o,
                **partials,
                tokens_ptr=tokens,  # [B] int64 out: the chosen tokens
                before_ptr=mass[0],  # [B] fp32 out: refusal mass before the bias (stats)
                after_ptr=mass[1],  # [B] fp32 out: refusal mass after the bias (stats)
                status_ptr=w["status"],  # [B] int32 out: codes.RowStatus | FALLBACK_FLAG
                V=vocab,
                NB=plan.n_blocks,
                **bias,
                temperature=temperature,
                top_p=float(p.top_p),
                seed=seed,
                k_sens=min(p.sensitive_top_k, vocab),
                top_k=min(p.top_k, vocab),
                c_shift=plan.c_shift,
                idx_bits=plan.idx_bits,
                write_logits=int(return_logits),
                stats=int(return_stats),
                greedy=int(plan.greedy),
                gumbel=int(plan.gumbel),
                cands=int(cands),
                topk=int(plan.top_k),
                topp=int(plan.top_p),
                X_PAD=plan.x_pad,
            ),
            dict(num_warps=plan.merge_warps, **no_fma),
        )
    )
    return launches, tokens, out, mass, w["status"]


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
            views[name] = storage[offset : offset + math.prod(shape)].view(shape)
            offset += size
    return views


def _fallback_rows(inp, rows, tokens, logits, stats, return_logits, return_stats):
    """Recompute rows the candidates could not decide exactly with the torch reference
    (rare: a nucleus wider than the candidate slots, or a huge sensitive/top-k)."""
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
