#include "kernels/numeric_formats.h"

#include <cmath>
#include <limits>
#include <random>

#include "gtest/gtest.h"

namespace blocksel {
namespace {

// Independent e4m3fn decoder from the format's definition.
double DecodeByDefinition(int bits) {
  const int sign = bits >> 7;
  const int exponent = (bits >> 3) & 0xF;
  const int mantissa = bits & 0x7;
  const double magnitude = exponent == 0 ? mantissa / 8.0 * std::pow(2.0, -6)
                                         : (1.0 + mantissa / 8.0) * std::pow(2.0, exponent - 7);
  return sign ? -magnitude : magnitude;
}

// Nearest finite e4m3fn code by exhaustive search; ties go to the even code.
int NearestCode(double value) {
  if (value >= 448.0) return 0x7E;
  if (value <= -448.0) return 0xFE;
  int best = -1;
  double best_error = INFINITY;
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7F) == 0x7F) continue;
    if ((code & 0x80) != (std::signbit(value) ? 0x80 : 0)) continue;
    const double error = std::fabs(DecodeByDefinition(code) - value);
    if (error < best_error || (error == best_error && (code & 1) == 0)) {
      best = code;
      best_error = error;
    }
  }
  return best;
}

TEST(Fp8E4m3, DecodesEveryCodeLikeTheDefinition) {
  for (int code = 0; code < 256; ++code) {
    const float value = Fp8E4m3ToFloat(static_cast<uint8_t>(code));
    if ((code & 0x7F) == 0x7F) {
      EXPECT_TRUE(std::isnan(value)) << code;
    } else {
      EXPECT_EQ(value, DecodeByDefinition(code)) << code;
    }
  }
  EXPECT_EQ(Fp8E4m3ToFloat(0x7E), 448.0f);
  EXPECT_EQ(Fp8E4m3ToFloat(0x01), std::ldexp(1.0f, -9));
}

TEST(Fp8E4m3, EncodingRoundTripsEveryFiniteCode) {
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7F) == 0x7F) continue;
    EXPECT_EQ(FloatToFp8E4m3(Fp8E4m3ToFloat(static_cast<uint8_t>(code))), code) << code;
  }
}

TEST(Fp8E4m3, EncodingRoundsToNearestEvenAndSaturates) {
  std::mt19937_64 random(1);
  std::uniform_real_distribution<float> exponent(-12.0f, 9.5f);
  for (int i = 0; i < 20000; ++i) {
    float value = std::exp2(exponent(random));
    if (i % 2) value = -value;
    ASSERT_EQ(FloatToFp8E4m3(value), NearestCode(value)) << value;
  }
  // Exact midpoints: 1 + 1/16 lies between codes 0x38 (1.0) and 0x39 (1.125).
  EXPECT_EQ(FloatToFp8E4m3(1.0625f), 0x38);
  EXPECT_EQ(FloatToFp8E4m3(1.1875f), 0x3A);  // between 0x39 and 0x3A: even
  EXPECT_EQ(FloatToFp8E4m3(1e6f), 0x7E);
  EXPECT_EQ(FloatToFp8E4m3(-1e6f), 0xFE);
  EXPECT_EQ(FloatToFp8E4m3(std::numeric_limits<float>::infinity()), 0x7E);
  EXPECT_EQ(FloatToFp8E4m3(std::nanf("")), 0x7F);
  EXPECT_EQ(FloatToFp8E4m3(std::ldexp(1.0f, -11)), 0x00);  // below half the least step
}

TEST(Bf16, RoundsToNearestEvenAndKeepsNan) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3F80);
  // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8)), 0x3F80);
  // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: even is the upper.
  EXPECT_EQ(FloatToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3F82);
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::nanf("")))));
  for (uint32_t bits = 0; bits < 0x10000; bits += 7) {
    const float value = Bf16ToFloat(static_cast<uint16_t>(bits));
    if (!std::isnan(value)) {
      EXPECT_EQ(FloatToBf16(value), bits);
    }
  }
}

}  // namespace
}  // namespace blocksel
