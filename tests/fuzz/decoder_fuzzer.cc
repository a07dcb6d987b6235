// Fuzzes the client's byte decoders: bf16 and fp8 keys, block ids of a
// Selection, and a whole SelectResponse; the first byte picks which.
#include <cstddef>
#include <cstdint>
#include <string>

#include "blocksel/v1/block_selector.pb.h"
#include "client/blocksel_client.h"
#include "client/encoding.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string bytes(reinterpret_cast<const char*>(data + 1), size - 1);
  switch (data[0] % 4) {
    case 0:
      (void)blocksel::DecodeBf16(bytes);
      break;
    case 1:
      (void)blocksel::DecodeFp8E4m3(bytes);
      break;
    case 2: {
      blocksel::v1::Selection selection;
      if (selection.ParseFromString(bytes)) (void)blocksel::DecodeBlockIds(selection);
      break;
    }
    default: {
      blocksel::v1::SelectResponse response;
      if (response.ParseFromString(bytes)) {
        absl::StatusOr<blocksel::SelectResult> result = blocksel::ToSelectResult(response);
        // Every id the result holds must be reachable through at().
        if (result.ok() && !result->block_ids.empty()) {
          (void)result->at(result->num_heads - 1, result->total_q - 1, result->topk - 1);
        }
      }
      break;
    }
  }
  return 0;
}
