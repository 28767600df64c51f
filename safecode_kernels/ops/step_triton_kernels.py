"""Triton kernels of the fused step op (docs/design.md §2). The launcher is :mod:`.step_triton`.

Three kernels, one step:

1. ``row_max_kernel`` (only when the plausibility cutoff is on): partial maxima of the real
   logits per (row, vocabulary block). The cutoff ``log(beta) + max(zr)`` must be known
   before a token can be called banned, and the whole pipeline below (top-k candidates,
   sum-exp, Gumbel-max, the written logits) depends on it, so this cheap pass reads the
   real row once more (half the input bytes; for decoding-sized batches it comes from L2).
2. ``step_block_kernel``, grid ``(rows, vocabulary blocks)``: reads each input logit once,
   computes the contrast, the refusal bias where it is known here (see below), and
   everything a row needs from its block: error flags, the greedy best, online
   max/sum-exp (non-refusal tokens, refusal tokens before and after the bias), the
   Gumbel-max best, and the block's top-``C`` candidates (a radix select on the float's
   ordered bits and the index: exact, never a sort). It writes the modulated logits when
   asked.
3. ``step_merge_kernel``, grid ``(rows,)``: merges the block partials and the candidates:
   the sensitive set (the k-th largest candidate), the bias of the refusal candidates in it,
   the refusal mass before and after, the token (argmax, Gumbel-max, or top-k/top-p over the
   candidates), and one status word per row that the launcher checks. It never reads the
   logits, so one compiled merge serves every dtype.

Sampling scales ``(z' - max z') / T`` as the torch reference does (never ``z' / T``: huge
finite logits over a small temperature would overflow): each block shifts by its own max and
the merge rescales the blocks' partials to the row's max.

The compiled variants are few on purpose (see ``step_triton.kernel_variants``): the cheap
switches are runtime arguments, and only the constexprs that change a kernel's shape remain.

Refusal tokens: each is handled by the block that holds it, from the refusal mask, so no
kernel's shape, registers or compile time depends on the size of the refusal set (up to V).
With scope "all" (or ``sensitive_top_k >= V``) or ``sensitive_top_k == 0`` the bias of every
refusal token is known before the merge: the blocks apply it, and all reductions are over
final values. With the sensitive top-k set, a refusal token is biased only if it is among the
row's top-k, which is known only after the merge; such a token is among its block's top-``C``
candidates (``C >= k``), so the refusal tokens among the candidates are left out of the
block reductions (*pending*) and the merge finishes them, while every other refusal token is
outside the top-k (unbiased) and reduced in its block like any token. Reductions over final
values never change, so greedy argmax, sum-exp and Gumbel-max stay exact with a single read.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .codes import FALLBACK_FLAG as _FALLBACK_FLAG
from .codes import RowStatus, SensitiveSet, Verdict

# Per-block flag bits (written by step_block_kernel).
BLOCK_ZR_BAD = tl.constexpr(1)  # NaN or +inf in logits_real
BLOCK_ZN_BAD = tl.constexpr(2)  # NaN or +inf in logits_noised
BLOCK_Z_BAD = tl.constexpr(4)  # the contrast gave NaN or +inf
BLOCK_LIVE = tl.constexpr(8)  # some token (refusal or not) has z > -inf
BLOCK_LIVE_FINAL = tl.constexpr(16)  # some token the merge does not bias has z' > -inf
BLOCK_BIAS_BAD = tl.constexpr(32)  # the refusal bias overflowed on such a token

# The codes of codes.py, as the constexprs a kernel can read. The merge kernel writes one
# word per row: the row's RowStatus (the first problem in the reference's check order), plus
# FALLBACK_FLAG when the candidates could not decide the row exactly.
STATUS_OK = tl.constexpr(int(RowStatus.OK))
STATUS_REAL_NOT_FINITE = tl.constexpr(int(RowStatus.REAL_NOT_FINITE))
STATUS_NOISED_NOT_FINITE = tl.constexpr(int(RowStatus.NOISED_NOT_FINITE))
STATUS_ALL_BANNED_CONTRAST = tl.constexpr(int(RowStatus.ALL_BANNED_CONTRAST))
STATUS_OVERFLOW_CONTRAST = tl.constexpr(int(RowStatus.OVERFLOW_CONTRAST))
STATUS_ALL_BANNED_BIAS = tl.constexpr(int(RowStatus.ALL_BANNED_BIAS))
STATUS_OVERFLOW_BIAS = tl.constexpr(int(RowStatus.OVERFLOW_BIAS))
FALLBACK_FLAG = tl.constexpr(int(_FALLBACK_FLAG))
VERDICT_UNSAFE = tl.constexpr(int(Verdict.UNSAFE))
VERDICT_SAFE = tl.constexpr(int(Verdict.SAFE))
SENS_NONE = tl.constexpr(int(SensitiveSet.NONE))
SENS_ALL = tl.constexpr(int(SensitiveSet.ALL))
SENS_TOP_K = tl.constexpr(int(SensitiveSet.TOP_K))

# Most vocabulary blocks of a row: the width of the loads of per-block partials (the launcher
# picks blocks large enough; a fixed width keeps it out of the compiled variants).
NB_MAX = tl.constexpr(256)

NEG_INF = tl.constexpr(float("-inf"))
POS_INF = tl.constexpr(float("inf"))


# ----------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------
@triton.jit
def _ordered_key(x):
    """fp32 -> uint32 whose unsigned order is the float order (> 0 for every non-NaN).

    ``-0.0`` maps to the key of ``+0.0``: torch treats them as a tie (broken by index)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.uint32, bitcast=True)
    # x ^ 0xFFFFFFFF rather than ~x: some Triton interpreters reject ~ of unsigned tensors with numpy 2.
    return tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _idx_mask(idx_bits):
    return (tl.full((), 1, dtype=tl.int64) << idx_bits) - 1


@triton.jit
def _rank_key(z, idx, idx_bits):
    """int64 key ordering tokens as torch does: larger value first, then lower index.

    ``(ordered value bits << idx_bits) | (2**idx_bits - 1 - idx)`` with ``2**idx_bits >= V``;
    -1 for -inf (no token)."""
    key = (_ordered_key(z).to(tl.int64) << idx_bits) | (_idx_mask(idx_bits) - idx.to(tl.int64))
    return tl.where(z > NEG_INF, key, -1)


@triton.jit
def _kth_largest_key(key, k):
    """A threshold selecting the k largest of distinct int64 keys (>= 0; -1 = absent) by
    radix select: one count per bit, from the highest bit where the keys differ, stopping as
    soon as exactly k keys are >= the prefix (no sort). ``key >= result`` then selects the k
    largest keys; the result is > 0 when at least k keys are present and 0 (select every
    present key) when fewer are. The prefix can lie below the k-th key itself
    (:func:`_smallest_selected` gives that)."""
    present = key >= 0
    n_present = tl.sum(present.to(tl.int32), axis=0)
    hi = tl.max(key, axis=0)
    lo = tl.min(tl.where(present, key, hi), axis=0)
    # Bit length of hi ^ lo from the exponent of its float64 value (rounding can only
    # overstate it by one, which costs one more step and changes nothing; keys < 2**63).
    diff = hi ^ lo
    nbits = tl.where(diff > 0, (diff.to(tl.float64).to(tl.int64, bitcast=True) >> 52) - 1022, 0)
    nbits = tl.minimum(nbits, 63).to(tl.int32)
    one = tl.full((), 1, dtype=tl.int64)
    prefix = hi & ~((one << nbits) - 1)  # the bits every present key shares: count = n_present
    count = n_present
    bit = nbits
    while (bit > 0) & (count != k):
        bit -= 1
        trial = prefix | (one << bit)
        trial_count = tl.sum((key >= trial).to(tl.int32), axis=0)
        take = trial_count >= k
        prefix = tl.where(take, trial, prefix)
        count = tl.where(take, trial_count, count)
    # With exactly k keys the prefix may be 0 (keys sharing no leading bit), which would read
    # as "fewer than k": the smallest key selects the same ones.
    return tl.where(n_present > k, prefix, tl.where(n_present == k, lo, 0))


@triton.jit
def _smallest_selected(key, threshold):
    """The smallest key ``>= threshold`` (a :func:`_kth_largest_key` result): the k-th largest
    key itself, or 0 when the threshold is 0 (fewer than k keys)."""
    smallest = tl.min(tl.where(key >= threshold, key, 0x7FFFFFFFFFFFFFFF), axis=0)
    return tl.where(threshold > 0, smallest, 0)


@triton.jit
def _uniform_to_gumbel(bits):
    """uint32 random bits -> Gumbel(0, 1) noise, from a uniform strictly inside (0, 1)
    (24-bit grid; the noise is clipped to about [-2.9, 17.3], a tail mass of ~6e-8)."""
    u = ((bits >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2**-24
    return -tl.log(-tl.log(u))


@triton.jit
def _gumbel_at(seed, row, idx):
    """Gumbel noise of token ``idx`` (int32 tensor) in ``row``: Philox counter
    ``(idx // 4, row)``, lane ``idx % 4``. Same values as :func:`_gumbel_block`."""
    counter = (row.to(tl.int64) << 32) | (idx >> 2).to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    lane = idx & 3
    bits = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return _uniform_to_gumbel(bits)


@triton.jit
def _gumbel_block(seed, row, start, BLOCK: tl.constexpr):
    """Gumbel noise of tokens ``start .. start + BLOCK`` (``start % 4 == 0``): one Philox
    call yields four lanes, so a block costs BLOCK / 4 Philox evaluations."""
    quad = (start >> 2) + tl.arange(0, BLOCK // 4)
    counter = (row.to(tl.int64) << 32) | quad.to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    lane = tl.arange(0, 4)[None, :]
    bits = tl.where(
        lane == 0, r0[:, None], tl.where(lane == 1, r1[:, None], tl.where(lane == 2, r2[:, None], r3[:, None]))
    )
    return _uniform_to_gumbel(tl.reshape(bits, (BLOCK,)))


@triton.jit
def _contrast(zr, zn, row, verdict_ptr, rowmax_ptr, NB, plaus, real_weight, alpha, alpha_safe, log_beta):
    """``z = w * zr - alpha_verdict * zn``, -inf where banned (docs/design.md §2.2 step 1), in fp32.

    With ``plaus`` (0 or 1) the row's max comes from row_max_kernel's partials; without, the
    masked load gives -inf and the cutoff bans nothing."""
    verdict = tl.load(verdict_ptr + row)
    a = tl.where(verdict == VERDICT_SAFE, alpha_safe, alpha)
    blocks = tl.arange(0, NB_MAX)
    parts = tl.load(rowmax_ptr + row.to(tl.int64) * NB + blocks, mask=blocks < NB * plaus, other=NEG_INF)
    cutoff = log_beta + tl.max(parts, axis=0)
    banned = (zr == NEG_INF) | (zn == NEG_INF) | (zr < cutoff)
    # Banned lanes compute on zeros: no inf - inf (their result is replaced anyway).
    z = real_weight * tl.where(banned, 0.0, zr) - a * tl.where(banned, 0.0, zn)
    return tl.where(banned, NEG_INF, z)


@triton.jit
def _finite_or_zero(m):
    """A max used as the shift of exp(x - m): 0 when it is -inf (no token), so that
    exp(-inf - m) is 0 rather than NaN."""
    return tl.where(m > NEG_INF, m, 0.0)


@triton.jit
def _best(values, idx, sentinel):
    """(max value, lowest index holding it)."""
    best = tl.max(values, axis=0)
    return best, tl.min(tl.where(values == best, idx, sentinel), axis=0)


@triton.jit
def _any_bit(flags, bit):
    return tl.max(((flags & bit) != 0).to(tl.int32), axis=0)


@triton.jit
def _max_sum_exp(v):
    """``(max, sum of exp(v - max))`` of values ``v`` (-inf: absent; the sum is 0 then)."""
    m = tl.max(v, axis=0)
    return m, tl.sum(tl.where(v > NEG_INF, tl.exp(v - _finite_or_zero(m)), 0.0), axis=0)


@triton.jit
def _refusal_mass(ref_max, ref_sum, other_max, other_sum, values):
    """Mass of the refusal tokens under softmax, from the (max, sum-exp) of the refusal tokens
    the blocks reduced, the same of the non-refusal tokens, and the values of the refusal
    tokens the merge holds (``values``, -inf elsewhere)."""
    m = _finite_or_zero(tl.maximum(tl.maximum(ref_max, other_max), tl.max(values, axis=0)))
    num = tl.sum(tl.where(values > NEG_INF, tl.exp(values - m), 0.0), axis=0)
    num += tl.where(ref_max > NEG_INF, ref_sum * tl.exp(ref_max - m), 0.0)
    den = num + tl.where(other_max > NEG_INF, other_sum * tl.exp(other_max - m), 0.0)
    return num / tl.where(den > 0.0, den, 1.0)


@triton.jit
def _lanes_equal(scalar, value, lanes):
    """``scalar == value`` as a bool tensor shaped like the int ``lanes`` (the interpreter
    turns a scalar comparison combined with bool tensors into int32, which masks refuse)."""
    return (lanes * 0 + scalar) == value


@triton.jit
def _row_bias(verdict_ptr, row, bias_unsafe, bias_safe):
    """The refusal bias of the row's verdict (0 for no verdict)."""
    verdict = tl.load(verdict_ptr + row)
    return tl.where(verdict == VERDICT_UNSAFE, bias_unsafe, tl.where(verdict == VERDICT_SAFE, bias_safe, 0.0))


@triton.jit
def _merge_sum_exp(max_ptr, sum_ptr, offs, mask, base):
    """Sum of per-block ``sum * exp(max - base)``."""
    m = tl.load(max_ptr + offs, mask=mask, other=NEG_INF)
    s = tl.load(sum_ptr + offs, mask=mask, other=0.0)
    return tl.sum(tl.where(m > NEG_INF, s * tl.exp(m - _finite_or_zero(base)), 0.0), axis=0)


@triton.jit
def _merge_scaled_sum_exp(max_ptr, sum_ptr, offs, mask, shift, temperature):
    """Sum of per-block ``sum * exp((max - shift) / T)``: blocks hold ``sum exp((x - max) / T)``."""
    m = tl.load(max_ptr + offs, mask=mask, other=NEG_INF)
    s = tl.load(sum_ptr + offs, mask=mask, other=0.0)
    return tl.sum(tl.where(m > NEG_INF, s * tl.exp(tl.div_rn(m - shift, temperature)), 0.0), axis=0)


@triton.jit
def _mass_threshold_key(key, prob, top_p):
    """The largest key ``t`` with ``sum(prob[key >= t]) >= top_p`` (0 when the whole mass is
    below ``top_p``): ``key >= t`` is then the top-p nucleus, as sorting by key descending and
    keeping tokens whose mass before them is ``< top_p`` gives. A radix search from the
    highest bit where the present keys differ (no sort: the mass above a key is monotone)."""
    present = key >= 0
    hi = tl.max(key, axis=0)
    lo = tl.min(tl.where(present, key, hi), axis=0)
    diff = hi ^ lo
    nbits = tl.where(diff > 0, (diff.to(tl.float64).to(tl.int64, bitcast=True) >> 52) - 1022, 0)
    nbits = tl.minimum(nbits, 63).to(tl.int32)
    one = tl.full((), 1, dtype=tl.int64)
    prefix = hi & ~((one << nbits) - 1)  # every present key is >= prefix: the whole mass
    reached = tl.sum(tl.where(present, prob, 0.0), axis=0) >= top_p
    bit = nbits
    while bit > 0:
        bit -= 1
        trial = prefix | (one << bit)
        mass = tl.sum(tl.where(key >= trial, prob, 0.0), axis=0)
        prefix = tl.where(mass >= top_p, trial, prefix)
    return tl.where(reached, prefix, 0)


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
# Arguments a kernel is never specialised on (their value or alignment would multiply the
# compiled variants for nothing). The "aligned" twins of the two hot kernels are specialised on
# the alignment of the logits (16-byte aligned rows: vectorised loads); the launcher takes them
# only when every such argument is divisible by 16, and the "any" twins otherwise.
ROW_MAX_LAYOUT = ("zr_ptr", "stride_r", "V")
ROW_MAX_DNS = ("NB",)
BLOCK_LAYOUT = ("zr_ptr", "zn_ptr", "stride_r", "stride_n", "V", "stride_o")
BLOCK_DNS = (
    "verdict_ptr",
    "NB",
    "plaus",
    "sens",
    "seed",
    "k_cand",
    "c_shift",
    "idx_bits",
    "write_logits",
    "sumexp",
    "argmax",
    "usum",
    "gumbel",
)


def _row_max(zr_ptr, stride_r, part_ptr, V, NB, BLOCK: tl.constexpr):
    """Partial max of the real logits per (row, block), for the plausibility cutoff. Grid
    ``(rows, blocks)``."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(zr_ptr + row * stride_r + offs, mask=offs < V, other=NEG_INF).to(tl.float32)
    tl.store(part_ptr + row * NB + blk, tl.max(x, axis=0))


def _step_block(
    zr_ptr,
    zn_ptr,
    stride_r,
    stride_n,
    verdict_ptr,
    refmask_ptr,
    rowmax_ptr,
    out_ptr,
    stride_o,
    flags_ptr,
    best_val_ptr,
    best_idx_ptr,
    zmax_ptr,
    zsum_ptr,
    rmax_ptr,
    rsum_ptr,
    amax_ptr,
    asum_ptr,
    gumbel_val_ptr,
    gumbel_idx_ptr,
    umax_ptr,
    usum_ptr,
    cand_val_ptr,
    cand_idx_ptr,
    cand_count_ptr,
    tail_ptr,
    V,
    NB,
    plaus,
    real_weight,
    alpha,
    alpha_safe,
    log_beta,
    bias_unsafe,
    bias_safe,
    sens,
    temperature,
    seed,
    k_cand,
    c_shift,
    idx_bits,
    write_logits,
    sumexp,
    argmax,
    usum,
    gumbel,
    BLOCK: tl.constexpr,
    CANDS: tl.constexpr,
):
    """One (row, block) of the step, grid ``(rows, blocks)``: all partial results of the
    block's tokens, refusal tokens included. The switches ``write_logits``, ``sumexp``,
    ``argmax``, ``usum``, ``gumbel`` (0 or 1) and ``sens`` (a SensitiveSet) are runtime
    branches; ``CANDS`` (the radix select, which needs many registers) is a constexpr so that
    the kernels without it keep a high occupancy.

    A refusal token's bias is applied here unless the sensitive set decides it (``sens`` is
    TOP_K): then the refusal tokens among the block's candidates are *pending* (left out of
    every reduction here; the merge biases them or not), and every other refusal token ranks
    below the block's top-``k_cand``, so outside the sensitive set: unbiased, final here.

    Partials are indexed ``row * NB + block``; candidates ``(row * NB + block) * 2**c_shift + j``.
    """
    row = tl.program_id(0)
    blk = tl.program_id(1)
    row64 = row.to(tl.int64)
    part = row64 * NB + blk
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    inside = offs < V

    # The only read of the two input rows (out-of-range lanes are -inf, i.e. banned).
    zr = tl.load(zr_ptr + row64 * stride_r + offs, mask=inside, other=NEG_INF).to(tl.float32)
    zn = tl.load(zn_ptr + row64 * stride_n + offs, mask=inside, other=NEG_INF).to(tl.float32)
    z = _contrast(zr, zn, row, verdict_ptr, rowmax_ptr, NB, plaus, real_weight, alpha, alpha_safe, log_beta)
    is_ref = tl.load(refmask_ptr + offs, mask=inside, other=0) != 0
    z_bad = (z != z) | (z == POS_INF)
    flags = tl.max(((zr != zr) | (zr == POS_INF)).to(tl.int32), axis=0) * BLOCK_ZR_BAD
    flags |= tl.max(((zn != zn) | (zn == POS_INF)).to(tl.int32), axis=0) * BLOCK_ZN_BAD
    flags |= tl.max(z_bad.to(tl.int32), axis=0) * BLOCK_Z_BAD
    flags |= tl.max((z > NEG_INF).to(tl.int32), axis=0) * BLOCK_LIVE
    if sumexp != 0:
        # Refusal mass before the bias: every refusal token.
        m, s = _max_sum_exp(tl.where(is_ref & ~z_bad, z, NEG_INF))
        tl.store(rmax_ptr + part, m)
        tl.store(rsum_ptr + part, s)
    # z' as the reference computes it (where(target, z + bias, z)), except for pending tokens.
    bias = _row_bias(verdict_ptr, row, bias_unsafe, bias_safe)
    zb = tl.where(is_ref & _lanes_equal(sens, SENS_ALL, offs), z + bias, z)
    if write_logits != 0:
        # Pending tokens that the merge biases are rewritten by it afterwards.
        tl.store(out_ptr + row64 * stride_o + offs, zb, mask=inside)
    bias_bad = tl.max((zb == POS_INF).to(tl.int32), axis=0)  # such tokens are -inf in x: never pending
    flags |= bias_bad * BLOCK_BIAS_BAD
    # Ranked values; broken tokens are -inf here (a broken row is an error).
    x = tl.where(z_bad | (zb == POS_INF), NEG_INF, zb)
    if sumexp != 0:
        # The non-refusal tokens' part of the refusal masses.
        m, s = _max_sum_exp(tl.where(is_ref, NEG_INF, x))
        tl.store(zmax_ptr + part, m)
        tl.store(zsum_ptr + part, s)
    if CANDS:
        # The block's top-k_cand by (value desc, index asc), in index order.
        key = _rank_key(x, offs, idx_bits)
        chosen = key >= _kth_largest_key(key, k_cand)
        slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        dst = (part << c_shift) + slot
        tl.store(cand_val_ptr + dst, x, mask=chosen)
        tl.store(cand_idx_ptr + dst, offs, mask=chosen)
        n_live = tl.sum((x > NEG_INF).to(tl.int32), axis=0)
        tl.store(cand_count_ptr + part, tl.minimum(n_live, k_cand))
        # A block that kept only some of its live tokens reports the key of its last kept
        # one: every token it left out ranks below, which tells the merge how far the union
        # of the candidates is exact. A block that sent all its live tokens has no tail (-1).
        last = tl.min(tl.where(chosen, key, 0x7FFFFFFFFFFFFFFF), axis=0)
        tl.store(tail_ptr + part, tl.where(n_live > k_cand, last, -1))
        pending = chosen & is_ref & _lanes_equal(sens, SENS_TOP_K, offs)
    else:
        pending = tl.zeros((BLOCK,), dtype=tl.int1)
    # The values every reduction below covers: all tokens but the pending ones.
    xf = tl.where(pending, NEG_INF, x)
    # Some token outside the merge's hands is not -inf after the bias (+inf counts).
    flags |= (tl.max((xf > NEG_INF).to(tl.int32), axis=0) | bias_bad) * BLOCK_LIVE_FINAL
    tl.store(flags_ptr + part, flags)
    if sumexp != 0:
        # Refusal tokens after the bias, but the pending ones.
        m, s = _max_sum_exp(tl.where(is_ref, xf, NEG_INF))
        tl.store(amax_ptr + part, m)
        tl.store(asum_ptr + part, s)

    if argmax != 0:
        best, best_idx = _best(xf, offs, V)
        tl.store(best_val_ptr + part, best)
        tl.store(best_idx_ptr + part, best_idx)
    # Sampling scales (x - shift) / T, never x / T: huge logits over a small T would overflow.
    # The block's own max is the shift; the merge rescales to the row's max.
    if usum != 0:
        m = tl.max(xf, axis=0)
        tl.store(umax_ptr + part, m)
        u = tl.div_rn(xf - _finite_or_zero(m), temperature)
        tl.store(usum_ptr + part, tl.sum(tl.where(xf > NEG_INF, tl.exp(u), 0.0), axis=0))
    if gumbel != 0:
        # Gumbel-max: argmax(u + g) is a sample of softmax(u), and argmax merges across blocks.
        m = tl.max(xf, axis=0)
        tl.store(umax_ptr + part, m)
        u = tl.div_rn(xf - _finite_or_zero(m), temperature)
        score = u + _gumbel_block(seed, row, blk * BLOCK, BLOCK)
        best, best_idx = _best(score, offs, V)
        tl.store(gumbel_val_ptr + part, best)
        tl.store(gumbel_idx_ptr + part, best_idx)


row_max_kernel = triton.jit(_row_max, do_not_specialize=ROW_MAX_DNS)
row_max_kernel_any = triton.jit(_row_max, do_not_specialize=ROW_MAX_DNS + ROW_MAX_LAYOUT)
step_block_kernel = triton.jit(_step_block, do_not_specialize=BLOCK_DNS)
step_block_kernel_any = triton.jit(_step_block, do_not_specialize=BLOCK_DNS + BLOCK_LAYOUT)


# The merge kernel is specialised on nothing but its constexprs: one compiled variant per
# (mode, X_PAD), whatever the dtype, batch, vocabulary or alignment.
MERGE_PARAMS = (
    "verdict_ptr",
    "refmask_ptr",
    "out_ptr",
    "stride_o",
    "flags_ptr",
    "best_val_ptr",
    "best_idx_ptr",
    "zmax_ptr",
    "zsum_ptr",
    "rmax_ptr",
    "rsum_ptr",
    "amax_ptr",
    "asum_ptr",
    "gumbel_val_ptr",
    "gumbel_idx_ptr",
    "umax_ptr",
    "usum_ptr",
    "cand_val_ptr",
    "cand_idx_ptr",
    "cand_count_ptr",
    "tail_ptr",
    "tokens_ptr",
    "before_ptr",
    "after_ptr",
    "status_ptr",
    "V",
    "NB",
    "bias_unsafe",
    "bias_safe",
    "temperature",
    "top_p",
    "seed",
    "sens",
    "k_sens",
    "top_k",
    "c_shift",
    "idx_bits",
    "write_logits",
    "stats",
    "greedy",
    "gumbel",
    "cands",
    "topk",
    "topp",
)


@triton.jit(do_not_specialize=MERGE_PARAMS)
def step_merge_kernel(
    verdict_ptr,
    refmask_ptr,
    out_ptr,
    stride_o,
    flags_ptr,
    best_val_ptr,
    best_idx_ptr,
    zmax_ptr,
    zsum_ptr,
    rmax_ptr,
    rsum_ptr,
    amax_ptr,
    asum_ptr,
    gumbel_val_ptr,
    gumbel_idx_ptr,
    umax_ptr,
    usum_ptr,
    cand_val_ptr,
    cand_idx_ptr,
    cand_count_ptr,
    tail_ptr,
    tokens_ptr,
    before_ptr,
    after_ptr,
    status_ptr,
    V,
    NB,
    bias_unsafe,
    bias_safe,
    temperature,
    top_p,
    seed,
    sens,
    k_sens,
    top_k,
    c_shift,
    idx_bits,
    write_logits,
    stats,
    greedy,
    gumbel,
    cands,
    topk,
    topp,
    X_PAD: tl.constexpr,
):
    """One row: merge the block partials, bias the pending refusal tokens, choose the token.

    The lanes hold the blocks' candidates only (``cands``: the blocks sent some), so their
    number does not depend on the refusal set. ``sens``: a :class:`~.codes.SensitiveSet`;
    with TOP_K the refusal tokens among the candidates are pending and get the bias when they
    are in the top-``k_sens`` of the candidates (which hold the row's whole top-``k_sens``
    unless the row is flagged). Token: ``greedy``, ``gumbel`` (temperature only), or ``topk``
    / ``topp`` over the candidates. Every switch is a runtime 0 or 1: the merge is one
    program per row, so its register count hardly matters, and one compiled variant per
    ``X_PAD`` keeps the compile cost low. It never reads the logits (the block kernel
    computed every contrast), so one compiled merge serves every dtype."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    blocks = tl.arange(0, NB_MAX)
    block_ok = blocks < NB
    parts = row64 * NB + blocks
    bflags = tl.load(flags_ptr + parts, mask=block_ok, other=0)

    # X: the block candidates, one lane each (-inf elsewhere).
    lane = tl.arange(0, X_PAD)
    c_pad = 1 << c_shift
    blk = lane >> c_shift
    slot = lane & (c_pad - 1)
    is_cand = lane < NB * c_pad * cands
    count = tl.load(cand_count_ptr + row64 * NB + blk, mask=is_cand, other=0)
    is_cand = is_cand & (slot < count)
    cand_off = ((row64 * NB + blk) << c_shift) + slot
    xz = tl.load(cand_val_ptr + cand_off, mask=is_cand, other=NEG_INF)
    xidx = tl.load(cand_idx_ptr + cand_off, mask=is_cand, other=0)
    cand_ref = tl.load(refmask_ptr + xidx, mask=is_cand, other=0) != 0
    pending = is_cand & cand_ref & _lanes_equal(sens, SENS_TOP_K, lane)

    # Every token ranking at or above t_star is among the candidates (see step_block_kernel):
    # a row is decided when the last token it keeps ranks at or above t_star (-1: no block
    # left a live token out). Compared with that token's key, never with the radix prefix
    # that selects it, which can lie below t_star (a row that one block decides alone).
    t_star = tl.max(tl.load(tail_ptr + parts, mask=blocks < NB * cands, other=-1), axis=0)
    fallback = tl.zeros((), dtype=tl.int32)

    # 2-3. Sensitive set and refusal bias (the pending tokens; the blocks biased the others).
    # (Only TOP_K has pending tokens; one mask for both branches keeps its type in the interpreter.)
    key = _rank_key(xz, xidx, idx_bits)
    kth = tl.full((), 0x7FFFFFFFFFFFFFFF, dtype=tl.int64)
    if sens == SENS_TOP_K:
        kth = _kth_largest_key(key, k_sens)
        fallback |= (_smallest_selected(key, kth) < t_star).to(tl.int32)
    target = pending & (key >= kth) & (key >= 0)
    xzb = tl.where(target, xz + _row_bias(verdict_ptr, row, bias_unsafe, bias_safe), xz)
    if write_logits != 0:
        tl.store(out_ptr + row64 * stride_o + xidx, xzb, mask=target)

    # The row's status, in the reference's check order.
    live_after = _any_bit(bflags, BLOCK_LIVE_FINAL) | tl.max((pending & (xzb > NEG_INF)).to(tl.int32), axis=0)
    over_contrast = _any_bit(bflags, BLOCK_Z_BAD)
    over_bias = _any_bit(bflags, BLOCK_BIAS_BAD) | tl.max((pending & (xzb == POS_INF)).to(tl.int32), axis=0)
    status = tl.where(
        _any_bit(bflags, BLOCK_ZR_BAD) != 0,
        STATUS_REAL_NOT_FINITE,
        tl.where(
            _any_bit(bflags, BLOCK_ZN_BAD) != 0,
            STATUS_NOISED_NOT_FINITE,
            tl.where(
                (_any_bit(bflags, BLOCK_LIVE) == 0) & (over_contrast == 0),
                STATUS_ALL_BANNED_CONTRAST,
                tl.where(
                    over_contrast != 0,
                    STATUS_OVERFLOW_CONTRAST,
                    tl.where(
                        live_after == 0,
                        STATUS_ALL_BANNED_BIAS,
                        tl.where(over_bias != 0, STATUS_OVERFLOW_BIAS, STATUS_OK),
                    ),
                ),
            ),
        ),
    )

    if stats != 0:
        zmax = tl.max(tl.load(zmax_ptr + parts, mask=block_ok, other=NEG_INF), axis=0)
        zsum = _merge_sum_exp(zmax_ptr, zsum_ptr, parts, block_ok, zmax)
        rmax = tl.max(tl.load(rmax_ptr + parts, mask=block_ok, other=NEG_INF), axis=0)
        rsum = _merge_sum_exp(rmax_ptr, rsum_ptr, parts, block_ok, rmax)
        amax = tl.max(tl.load(amax_ptr + parts, mask=block_ok, other=NEG_INF), axis=0)
        asum = _merge_sum_exp(amax_ptr, asum_ptr, parts, block_ok, amax)
        tl.store(before_ptr + row, _refusal_mass(rmax, rsum, zmax, zsum, tl.where(lane < 0, xz, NEG_INF)))
        tl.store(after_ptr + row, _refusal_mass(amax, asum, zmax, zsum, tl.where(pending, xzb, NEG_INF)))

    # 4. Token choice. Sampling scales (z' - max z') / T, as the reference does: dividing
    # unshifted huge logits by a small T would overflow.
    if greedy != 0:
        block_best = tl.load(best_val_ptr + parts, mask=block_ok, other=NEG_INF)
        block_idx = tl.load(best_idx_ptr + parts, mask=block_ok, other=V)
        ref_best, ref_best_idx = _best(tl.where(pending, xzb, NEG_INF), xidx, V)
        best, best_idx = _best(block_best, block_idx, V)
        token = tl.where(
            ref_best > best, ref_best_idx, tl.where(ref_best == best, tl.minimum(ref_best_idx, best_idx), best_idx)
        )
    elif gumbel != 0:
        # Blocks scored (x - block max) / T + g; rescale their best to the row's max.
        block_max = tl.load(umax_ptr + parts, mask=block_ok, other=NEG_INF)
        pending_max = tl.max(tl.where(pending, xzb, NEG_INF), axis=0)
        row_max = _finite_or_zero(tl.maximum(tl.max(block_max, axis=0), pending_max))
        block_best = tl.load(gumbel_val_ptr + parts, mask=block_ok, other=NEG_INF)
        block_idx = tl.load(gumbel_idx_ptr + parts, mask=block_ok, other=V)
        shift = tl.div_rn(_finite_or_zero(block_max) - row_max, temperature)
        block_best = tl.where(block_best > NEG_INF, block_best + shift, NEG_INF)
        score = tl.div_rn(xzb - row_max, temperature) + _gumbel_at(seed, row, xidx)
        ref_best, ref_best_idx = _best(tl.where(pending, score, NEG_INF), xidx, V)
        best, best_idx = _best(block_best, block_idx, V)
        token = tl.where(ref_best > best, ref_best_idx, best_idx)
    else:
        # Top-k / top-p: every token that can be kept is a candidate (or the row falls back).
        allowed = is_cand & (xzb > NEG_INF)
        key = tl.where(allowed, _rank_key(xzb, xidx, idx_bits), -1)
        if topk != 0:
            kth = _kth_largest_key(key, top_k)
            fallback |= (_smallest_selected(key, kth) < t_star).to(tl.int32)
            allowed = allowed & (key >= kth)
            key = tl.where(allowed, key, -1)
        # The row's max is among the allowed tokens (the top token always is), or in a block.
        row_max = tl.max(tl.where(allowed, xzb, NEG_INF), axis=0)
        if (topp != 0) & (topk == 0):
            row_max = tl.maximum(row_max, tl.max(tl.load(umax_ptr + parts, mask=block_ok, other=NEG_INF), axis=0))
        row_max = _finite_or_zero(row_max)
        u = tl.div_rn(xzb - row_max, temperature)
        if topp != 0:
            if topk != 0:
                total = tl.sum(tl.where(allowed, tl.exp(u), 0.0), axis=0)
            else:
                # All tokens count: the blocks' sum-exp plus the pending tokens.
                total = _merge_scaled_sum_exp(umax_ptr, usum_ptr, parts, block_ok, row_max, temperature)
                total += tl.sum(tl.where(pending & (xzb > NEG_INF), tl.exp(u), 0.0), axis=0)
            prob = tl.where(allowed, tl.exp(u), 0.0) / total
            threshold = _mass_threshold_key(key, prob, top_p)
            keep = allowed & (key >= threshold)
            if topk == 0:
                # Exact iff the nucleus ends at a token ranked at or above t_star.
                reached = tl.sum(tl.where(keep, prob, 0.0), axis=0) >= top_p
                end = tl.where(reached, tl.min(tl.where(keep, key, 0x7FFFFFFFFFFFFFFF), axis=0), -1)
                exact = (t_star < 0) | (end >= t_star)
                fallback |= (exact == 0).to(tl.int32)
        else:
            keep = allowed
        score = tl.where(keep, u + _gumbel_at(seed, row, xidx), NEG_INF)
        winner = tl.argmax(score, axis=0)
        token = tl.sum(tl.where(lane == winner, xidx, 0), axis=0)

    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(status_ptr + row, status | fallback * FALLBACK_FLAG)
