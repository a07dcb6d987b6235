#include "client/encoding.h"

#include <cstring>
#include <limits>

#include "absl/numeric/int128.h"
#include "absl/strings/str_cat.h"
#include "kernels/numeric_formats.h"

namespace blocksel {

std::string EncodeBf16(absl::Span<const float> values) {
  std::string bytes(values.size() * 2, '\0');
  for (size_t i = 0; i < values.size(); ++i) {
    const uint16_t bits = FloatToBf16(values[i]);
    bytes[2 * i] = static_cast<char>(bits & 0xFF);
    bytes[2 * i + 1] = static_cast<char>(bits >> 8);
  }
  return bytes;
}

std::string EncodeFp8E4m3(absl::Span<const float> values) {
  std::string bytes(values.size(), '\0');
  for (size_t i = 0; i < values.size(); ++i) {
    bytes[i] = static_cast<char>(FloatToFp8E4m3(values[i]));
  }
  return bytes;
}

std::string EncodeKeys(absl::Span<const float> values, v1::KeyDtype dtype) {
  return dtype == v1::KEY_DTYPE_FP8_E4M3 ? EncodeFp8E4m3(values) : EncodeBf16(values);
}

std::vector<float> DecodeBf16(const std::string& bytes) {
  std::vector<float> values(bytes.size() / 2);
  for (size_t i = 0; i < values.size(); ++i) {
    const uint16_t bits = static_cast<uint16_t>(static_cast<uint8_t>(bytes[2 * i]) |
                                                (static_cast<uint8_t>(bytes[2 * i + 1]) << 8));
    values[i] = Bf16ToFloat(bits);
  }
  return values;
}

std::vector<float> DecodeFp8E4m3(const std::string& bytes) {
  std::vector<float> values(bytes.size());
  for (size_t i = 0; i < values.size(); ++i) {
    values[i] = Fp8E4m3ToFloat(static_cast<uint8_t>(bytes[i]));
  }
  return values;
}

std::vector<float> DecodeKeys(const std::string& bytes, v1::KeyDtype dtype) {
  return dtype == v1::KEY_DTYPE_FP8_E4M3 ? DecodeFp8E4m3(bytes) : DecodeBf16(bytes);
}

absl::StatusOr<std::vector<int32_t>> DecodeBlockIds(const v1::Selection& selection) {
  // 128-bit, so that no choice of dimensions can wrap the count around to
  // the size of the bytes (the dimensions come from the wire).
  const absl::uint128 count =
      absl::uint128(selection.num_heads()) * selection.total_q() * selection.topk();
  constexpr uint32_t kMaxDimension = std::numeric_limits<int32_t>::max();
  if (selection.num_heads() > kMaxDimension || selection.total_q() > kMaxDimension ||
      selection.topk() > kMaxDimension ||
      absl::uint128(selection.block_ids().size()) != count * sizeof(int32_t)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "selection holds ", selection.block_ids().size(), " bytes, expected ",
        static_cast<uint64_t>(count) * sizeof(int32_t), " for [", selection.num_heads(), ", ",
        selection.total_q(), ", ", selection.topk(), "] int32"));
  }
  std::vector<int32_t> ids(static_cast<size_t>(count));
  std::memcpy(ids.data(), selection.block_ids().data(), ids.size() * sizeof(int32_t));
  return ids;
}

}  // namespace blocksel
