#include "tests/support/test_model.h"

#include "client/encoding.h"

namespace blocksel::testing {

ModelConfig SmallTestModel() {
  ModelConfig model;
  model.num_layers = 4;
  model.first_sparse_layer = kTestFirstSparseLayer;
  model.num_heads = 2;
  model.head_dim = 32;
  model.key_dtype = KeyDtype::kBf16;
  model.topk = 4;
  model.init_blocks = 1;
  model.local_blocks = 1;
  model.max_positions = 4096;
  return model;
}

EncodedBf16 RandomBf16(std::mt19937_64& random, int64_t count) {
  std::normal_distribution<float> normal;
  std::vector<float> raw(count);
  for (float& value : raw) value = normal(random);
  EncodedBf16 encoded;
  encoded.bytes = EncodeBf16(raw);
  encoded.values = DecodeBf16(encoded.bytes);
  return encoded;
}

}  // namespace blocksel::testing
