// Packing floats into the API's byte payloads and unpacking block ids.
#ifndef BLOCKSEL_CLIENT_ENCODING_H_
#define BLOCKSEL_CLIENT_ENCODING_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "blocksel/v1/block_selector.pb.h"

namespace blocksel {

// Little-endian bf16, round to nearest even.
std::string EncodeBf16(absl::Span<const float> values);
// OCP e4m3fn bytes, saturating round to nearest even, no scale.
std::string EncodeFp8E4m3(absl::Span<const float> values);
// Keys in the given dtype (KEY_DTYPE_BF16 or KEY_DTYPE_FP8_E4M3).
std::string EncodeKeys(absl::Span<const float> values, v1::KeyDtype dtype);

// The float values the server will see for encoded keys or queries.
std::vector<float> DecodeBf16(const std::string& bytes);
std::vector<float> DecodeFp8E4m3(const std::string& bytes);
std::vector<float> DecodeKeys(const std::string& bytes, v1::KeyDtype dtype);

// Block ids of a selection as int32 in the selection's layout.
// INVALID_ARGUMENT if the byte count does not match its shape.
absl::StatusOr<std::vector<int32_t>> DecodeBlockIds(const v1::Selection& selection);

}  // namespace blocksel

#endif  // BLOCKSEL_CLIENT_ENCODING_H_
