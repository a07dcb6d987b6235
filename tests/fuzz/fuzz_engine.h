// The engine the fuzz targets drive: a small model on the CPU backend, with
// two sequences holding keys, so that fuzzed requests reach every check.
#ifndef BLOCKSEL_TESTS_FUZZ_FUZZ_ENGINE_H_
#define BLOCKSEL_TESTS_FUZZ_FUZZ_ENGINE_H_

#include <memory>

#include "server/engine/engine.h"

namespace blocksel::fuzzing {

// 3 layers (1 and 2 sparse), H=2, D=16, bf16 keys, topk 4, init 1, local
// 1, 2048 positions, 64 pages. Sequences 1 (300 tokens) and 2 (1000
// tokens) have keys in both sparse layers.
ModelConfig FuzzModel();
std::unique_ptr<Engine> MakeFuzzEngine(bool with_sequences);

}  // namespace blocksel::fuzzing

#endif  // BLOCKSEL_TESTS_FUZZ_FUZZ_ENGINE_H_
