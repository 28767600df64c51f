// Branch-free conversions of fp16 / bf16 bit patterns to float, written so that a loop of
// them vectorises (no table lookups, no branches): inputs are read in their own dtype and
// widened in registers, never converted up front into a copy.
#pragma once

#include <cstdint>
#include <cstring>

namespace safecode {

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// IEEE half -> float, exact for every input (normals, subnormals, inf, NaN).
inline float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t body = static_cast<uint32_t>(h & 0x7fffu) << 13;  // exponent+mantissa at float position
  const uint32_t exponent = body & (0x1fu << 23);
  // Normal numbers: rebias the exponent from 15 to 127.
  const uint32_t normal = body + ((127u - 15u) << 23);
  // Inf / NaN: saturate the exponent.
  const uint32_t special = body + ((255u - 31u) << 23);
  // Subnormals: build 2^-14 * (1 + m) as a float and subtract 2^-14 to drop the implicit one.
  const float sub = bits_to_float(body + (113u << 23)) - bits_to_float(113u << 23);
  uint32_t sub_bits;
  std::memcpy(&sub_bits, &sub, sizeof sub_bits);
  const uint32_t out = exponent == (0x1fu << 23) ? special : (exponent == 0 ? sub_bits : normal);
  return bits_to_float(out | sign);
}

template <typename T>
inline float load_as_float(const T* p, int64_t i);

template <>
inline float load_as_float<float>(const float* p, int64_t i) {
  return p[i];
}

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

template <>
inline float load_as_float<Half>(const Half* p, int64_t i) {
  return f16_to_float(p[i].bits);
}

template <>
inline float load_as_float<BFloat16>(const BFloat16* p, int64_t i) {
  return bf16_to_float(p[i].bits);
}

}  // namespace safecode
