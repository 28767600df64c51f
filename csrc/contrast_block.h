// The innermost loop of the CPU step kernel: the contrast of one block of a row,
//   z = banned ? -inf : w * real - alpha * noised,
// written to `out`, with the block maximum and a flag for NaN / +inf (in an input, or an
// overflowing contrast) reduced on the way. An AVX2 version (chosen at run time, so a
// portable build still uses wide vectors) and a scalar one compute bit-identical results:
// both round each product and the difference separately, as torch does.
#pragma once

#include <cfloat>
#include <cstdint>
#include <limits>

#include "float_convert.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SAFECODE_HAVE_AVX2_PATH 1
#endif

namespace safecode {

struct BlockStats {
  bool bad;   // NaN or +inf in an input, or an overflowing contrast
  float max;  // NaN entries are ignored
};

struct Contrast {
  float w, alpha, cutoff;  // cutoff: real logits below it are banned (-inf: no cutoff)

  float operator()(float r, float q) const {
    const float inf = std::numeric_limits<float>::infinity();
    const bool banned = r == -inf || q == -inf || r < cutoff;
    return banned ? -inf : w * r - alpha * q;
  }
};

template <typename T>
BlockStats contrast_block_scalar(const T* real, const T* noised, int64_t n, const Contrast& c, float* out) {
  BlockStats st{false, -std::numeric_limits<float>::infinity()};
  for (int64_t i = 0; i < n; ++i) {
    const float r = load_as_float(real, i), q = load_as_float(noised, i);
    const float z = c(r, q);
    st.bad |= !(r <= FLT_MAX) || !(q <= FLT_MAX) || !(z <= FLT_MAX);
    out[i] = z;
    st.max = z > st.max ? z : st.max;
  }
  return st;
}

#ifdef SAFECODE_HAVE_AVX2_PATH

__attribute__((target("avx2,f16c"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

__attribute__((target("avx2,f16c"))) inline __m256 load8(const Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

__attribute__((target("avx2,f16c"))) inline __m256 load8(const BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

// The exact loop: every NaN / +inf in an input or the contrast is flagged.
template <typename T>
__attribute__((target("avx2,f16c"))) BlockStats contrast_block_avx2(const T* real, const T* noised, int64_t n,
                                                                    const Contrast& c, float* out) {
  const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 finite_max = _mm256_set1_ps(FLT_MAX);
  const __m256 w = _mm256_set1_ps(c.w), alpha = _mm256_set1_ps(c.alpha), cutoff = _mm256_set1_ps(c.cutoff);
  __m256 max = neg_inf, bad = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 r = load8(real + i), q = load8(noised + i);
    const __m256 banned =
        _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(r, neg_inf, _CMP_EQ_OQ), _mm256_cmp_ps(q, neg_inf, _CMP_EQ_OQ)),
                     _mm256_cmp_ps(r, cutoff, _CMP_LT_OQ));
    const __m256 diff = _mm256_sub_ps(_mm256_mul_ps(w, r), _mm256_mul_ps(alpha, q));
    const __m256 z = _mm256_blendv_ps(diff, neg_inf, banned);
    // NLE_UQ: true for NaN and for anything above FLT_MAX, i.e. +inf.
    bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(r, finite_max, _CMP_NLE_UQ),
                                         _mm256_or_ps(_mm256_cmp_ps(q, finite_max, _CMP_NLE_UQ),
                                                      _mm256_cmp_ps(z, finite_max, _CMP_NLE_UQ))));
    _mm256_storeu_ps(out + i, z);
    max = _mm256_max_ps(z, max);  // returns the second operand when z is NaN
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, max);
  BlockStats st = contrast_block_scalar(real + i, noised + i, n - i, c, out + i);
  st.bad |= _mm256_movemask_ps(bad) != 0;
  for (float v : lanes) st.max = v > st.max ? v : st.max;
  return st;
}

// The loop every block runs: about 14 vector operations per 8 tokens instead of 22. Only
// the unbanned contrast d = w * r - alpha * q is checked, for not being finite: d is NaN or
// +inf whenever r is NaN or +inf or q is NaN, and -inf when q is +inf, so a block with any
// problem is flagged (and so is one with a -inf logit, or a contrast overflowing to -inf,
// which are allowed). A flagged block is recomputed by the exact loop above; blocks without
// -inf logits never are. Banning folds the cutoff and r == -inf into one compare: r < cutoff,
// with -FLT_MAX for "no cutoff" (only -inf is below it).
template <typename T>
__attribute__((target("avx2,f16c"))) BlockStats contrast_block_avx2_fast(const T* real, const T* noised, int64_t n,
                                                                         const Contrast& c, float* out) {
  const float inf = std::numeric_limits<float>::infinity();
  const __m256 neg_inf = _mm256_set1_ps(-inf);
  const __m256 finite_max = _mm256_set1_ps(FLT_MAX);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 w = _mm256_set1_ps(c.w), alpha = _mm256_set1_ps(c.alpha);
  const __m256 below = _mm256_set1_ps(c.cutoff > -inf ? c.cutoff : -FLT_MAX);
  __m256 max = neg_inf, flag = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 r = load8(real + i), q = load8(noised + i);
    const __m256 banned = _mm256_or_ps(_mm256_cmp_ps(r, below, _CMP_LT_OQ), _mm256_cmp_ps(q, neg_inf, _CMP_EQ_OQ));
    const __m256 diff = _mm256_sub_ps(_mm256_mul_ps(w, r), _mm256_mul_ps(alpha, q));
    const __m256 z = _mm256_blendv_ps(diff, neg_inf, banned);
    flag = _mm256_or_ps(flag, _mm256_cmp_ps(_mm256_andnot_ps(sign, diff), finite_max, _CMP_NLE_UQ));
    _mm256_storeu_ps(out + i, z);
    max = _mm256_max_ps(z, max);
  }
  if (_mm256_movemask_ps(flag) != 0) return contrast_block_avx2(real, noised, n, c, out);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, max);
  BlockStats st = contrast_block_scalar(real + i, noised + i, n - i, c, out + i);
  for (float v : lanes) st.max = v > st.max ? v : st.max;
  return st;
}

inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return has;
}

#endif  // SAFECODE_HAVE_AVX2_PATH

template <typename T>
BlockStats contrast_block(const T* real, const T* noised, int64_t n, const Contrast& c, float* out) {
#ifdef SAFECODE_HAVE_AVX2_PATH
  if (cpu_has_avx2()) return contrast_block_avx2_fast(real, noised, n, c, out);
#endif
  return contrast_block_scalar(real, noised, n, c, out);
}

}  // namespace safecode
