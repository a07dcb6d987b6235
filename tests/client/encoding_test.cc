#include "client/encoding.h"

#include <cstdint>
#include <string>
#include <vector>

#include "client/blocksel_client.h"
#include "gtest/gtest.h"

namespace blocksel {
namespace {

TEST(EncodingTest, BlockIdsRoundTrip) {
  v1::Selection selection;
  selection.set_num_heads(2);
  selection.set_total_q(3);
  selection.set_topk(1);
  const std::vector<int32_t> ids = {5, -1, 7, 0, 3, 2};
  selection.set_block_ids(std::string(reinterpret_cast<const char*>(ids.data()), 24));
  absl::StatusOr<std::vector<int32_t>> decoded = DecodeBlockIds(selection);
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(*decoded, ids);
  selection.set_topk(2);
  EXPECT_EQ(DecodeBlockIds(selection).status().code(), absl::StatusCode::kInvalidArgument);
}

// Dimensions from the wire whose product wraps around 64 bits to the byte
// count must be refused, not trusted.
TEST(EncodingTest, DimensionsThatWrapAroundAreRefused) {
  v1::Selection selection;
  selection.set_num_heads(1u << 31);
  selection.set_total_q(1u << 31);
  selection.set_topk(4);  // 2^64 ids: 0 modulo 2^64
  EXPECT_EQ(DecodeBlockIds(selection).status().code(), absl::StatusCode::kInvalidArgument);
  selection.set_num_heads(0xFFFFFFFFu);  // above int32
  selection.set_total_q(0);
  EXPECT_EQ(DecodeBlockIds(selection).status().code(), absl::StatusCode::kInvalidArgument);
}

// Found by decoder_fuzzer: an in-band error whose code is OK (or no code
// at all) must not become an OK status.
TEST(EncodingTest, InBandErrorsWithoutAnErrorCodeAreUnknown) {
  v1::SelectResponse response;
  response.mutable_error()->set_message("sequence 9 is not open");
  EXPECT_EQ(ToSelectResult(response).status().code(), absl::StatusCode::kUnknown);
  response.mutable_error()->set_code(99);
  EXPECT_EQ(ToSelectResult(response).status().code(), absl::StatusCode::kUnknown);
  response.mutable_error()->set_code(5);
  EXPECT_EQ(ToSelectResult(response).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace blocksel
