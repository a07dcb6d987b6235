// Exact scalar conversions between fp32 and the packed formats of the API.
// Header-only and dependency-free: used by kernels, the client and tests.
#ifndef BLOCKSEL_KERNELS_NUMERIC_FORMATS_H_
#define BLOCKSEL_KERNELS_NUMERIC_FORMATS_H_

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace blocksel {

inline float Bf16ToFloat(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof(value));
  return value;
}

// Round to nearest, ties to even; NaN stays a (quiet) NaN.
inline uint16_t FloatToBf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if (std::isnan(value)) return static_cast<uint16_t>((bits >> 16) | 0x40u);
  const uint32_t rounding = 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

// OCP e4m3fn: bias 7, no infinities, 0x7f/0xff are NaN, max finite 448.
inline float Fp8E4m3ToFloat(uint8_t bits) {
  const uint32_t magnitude = bits & 0x7Fu;
  if (magnitude == 0x7Fu) return std::numeric_limits<float>::quiet_NaN();
  const int exponent = static_cast<int>(magnitude >> 3);
  const float mantissa = static_cast<float>(magnitude & 0x7u);
  const float value =
      exponent == 0 ? std::ldexp(mantissa, -9) : std::ldexp(1.0f + mantissa / 8.0f, exponent - 7);
  return (bits & 0x80u) != 0 ? -value : value;
}

// Saturating cast: round to nearest even, clamp to [-448, 448]; NaN -> 0x7f.
inline uint8_t FloatToFp8E4m3(float value) {
  if (std::isnan(value)) return 0x7F;
  const uint8_t sign = std::signbit(value) ? 0x80 : 0x00;
  const float magnitude = std::fabs(value);
  if (magnitude >= 448.0f) return sign | 0x7E;
  // The representable magnitudes are few: pick the nearest by exponent. In
  // binade e (normal, e >= 1) the step is 2^(e-10); subnormals step 2^-9.
  int exponent;
  std::frexp(magnitude, &exponent);  // magnitude in [2^(exponent-1), 2^exponent)
  const int step_exponent = exponent - 1 < -6 ? -9 : exponent - 1 - 3;
  const float steps = std::nearbyint(std::ldexp(magnitude, -step_exponent));
  const float rounded = std::ldexp(steps, step_exponent);
  // Encode the rounded value (exactly representable, possibly one binade up).
  if (rounded == 0.0f) return sign;
  int rounded_exponent;
  const float fraction = std::frexp(rounded, &rounded_exponent);  // [0.5, 1)
  const int biased = rounded_exponent - 1 + 7;
  if (biased <= 0) {  // subnormal: rounded = m * 2^-9
    return sign | static_cast<uint8_t>(std::ldexp(rounded, 9));
  }
  const int mantissa = static_cast<int>(std::ldexp(fraction * 2.0f - 1.0f, 3));
  return sign | static_cast<uint8_t>((biased << 3) | mantissa);
}

}  // namespace blocksel

#endif  // BLOCKSEL_KERNELS_NUMERIC_FORMATS_H_
