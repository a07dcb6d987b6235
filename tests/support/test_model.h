// The small model and random payloads the engine and service tests share.
#ifndef BLOCKSEL_TESTS_SUPPORT_TEST_MODEL_H_
#define BLOCKSEL_TESTS_SUPPORT_TEST_MODEL_H_

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "server/engine/model_config.h"

namespace blocksel::testing {

// 4 layers (1, 2 and 3 sparse), H=2, D=32, bf16 keys, topk 4, init 1,
// local 1, 4096 positions: every selection rule shows within a few blocks.
inline constexpr int32_t kTestFirstSparseLayer = 1;
ModelConfig SmallTestModel();

// Random N(0, 1) values packed as bf16, and the float values the server
// decodes from the bytes.
struct EncodedBf16 {
  std::string bytes;
  std::vector<float> values;
};
EncodedBf16 RandomBf16(std::mt19937_64& random, int64_t count);

}  // namespace blocksel::testing

#endif  // BLOCKSEL_TESTS_SUPPORT_TEST_MODEL_H_
