// exp(x) for x <= 0 (arguments are always shifted by the row maximum), accurate to a few
// ulp and written so that loops over it vectorise: round-to-nearest by the 1.5*2^23 trick,
// Cody-Waite reduction by ln 2, a degree-6 polynomial, and the exponent set by bit shifts.
#pragma once

#include <cstdint>
#include <cstring>

namespace safecode {

inline float exp_nonpositive(float x) {
  // Below -87.3 the result is under FLT_MIN; it only ever adds to a sum that includes exp(0).
  const bool underflow = !(x > -87.0f);  // also true for -inf and NaN
  const float xc = underflow ? -87.0f : (x > 0.0f ? 0.0f : x);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (xc * 1.44269504088896341f + magic) - magic;
  const float r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  const uint32_t bits = static_cast<uint32_t>(e) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return underflow ? 0.0f : p * scale;
}

}  // namespace safecode
