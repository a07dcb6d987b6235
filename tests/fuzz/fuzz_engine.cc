#include "tests/fuzz/fuzz_engine.h"

#include <cstdint>
#include <string>
#include <utility>

#include "server/engine/cpu_backend.h"

namespace blocksel::fuzzing {

constexpr int64_t kPages = 64;

ModelConfig FuzzModel() {
  ModelConfig model;
  model.num_layers = 3;
  model.first_sparse_layer = 1;
  model.num_heads = 2;
  model.head_dim = 16;
  model.key_dtype = KeyDtype::kBf16;
  model.topk = 4;
  model.init_blocks = 1;
  model.local_blocks = 1;
  model.max_positions = 2048;
  return model;
}

std::unique_ptr<Engine> MakeFuzzEngine(bool with_sequences) {
  EngineOptions options;
  options.model = FuzzModel();
  options.num_pages = kPages;
  options.max_sequences = 16;
  auto backend = CpuBackend::Create(options.model, kPages, /*num_threads=*/1);
  if (!backend.ok()) return nullptr;
  auto engine = std::make_unique<Engine>(options, std::move(*backend));
  if (!with_sequences) return engine;
  for (const auto& [id, tokens] : {std::pair<uint64_t, uint32_t>{1, 300}, {2, 1000}}) {
    v1::OpenSequenceRequest open;
    open.set_sequence_id(id);
    (void)engine->OpenSequence(open);
    v1::AppendKeysRequest append;
    v1::KeyAppend* keys = append.add_appends();
    keys->set_sequence_id(id);
    keys->set_first_layer(1);
    keys->set_num_layers(2);
    keys->set_num_tokens(tokens);
    std::string bytes(size_t{2} * tokens * 16 * 2, '\0');
    for (size_t i = 0; i < bytes.size(); i += 2) bytes[i + 1] = static_cast<char>(0x3f + i % 3);
    keys->set_keys(std::move(bytes));
    (void)engine->AppendKeys(append);
  }
  return engine;
}

}  // namespace blocksel::fuzzing
