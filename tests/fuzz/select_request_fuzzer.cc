// Fuzzes request decoding, validation and selection: the input is a
// serialized SelectRequest (or AppendKeysRequest when the first byte is
// odd), run through the engine on the CPU backend. Any input must give a
// status, never a crash or an out-of-bounds access.
#include <cstddef>
#include <cstdint>
#include <memory>

#include "blocksel/v1/block_selector.pb.h"
#include "tests/fuzz/fuzz_engine.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using blocksel::Engine;
  // One engine for the run: requests may append keys, and the cache is
  // bounded, so state stays small.
  static std::unique_ptr<Engine> engine = blocksel::fuzzing::MakeFuzzEngine(true);
  if (size == 0) return 0;
  const bool append = (data[0] & 1) != 0;
  ++data;
  --size;
  if (append) {
    blocksel::v1::AppendKeysRequest request;
    if (request.ParseFromArray(data, static_cast<int>(size))) (void)engine->AppendKeys(request);
    return 0;
  }
  blocksel::v1::SelectRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  blocksel::v1::Selection selection;
  (void)engine->Select(request, &selection);
  return 0;
}
