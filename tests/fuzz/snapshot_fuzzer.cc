// Fuzzes the snapshot loader. The first input byte picks the mode: even,
// the rest is a whole file (so the CRC check refuses almost everything);
// odd, the rest is the body and the CRC-32 is appended, so the parser
// behind the check sees arbitrary contents.
#include <unistd.h>
#include <zlib.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "absl/time/clock.h"
#include "tests/fuzz/fuzz_engine.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const bool fix_crc = (data[0] & 1) != 0;
  std::string contents(reinterpret_cast<const char*>(data + 1), size - 1);
  if (fix_crc) {
    const uint32_t crc = static_cast<uint32_t>(
        crc32(crc32(0L, Z_NULL, 0), reinterpret_cast<const Bytef*>(contents.data()),
              static_cast<uInt>(contents.size())));
    contents.append(reinterpret_cast<const char*>(&crc), 4);
  }
  static const std::string path = (std::filesystem::temp_directory_path() /
                                   ("blocksel_snapshot_fuzz_" + std::to_string(::getpid())))
                                      .string();
  {
    std::ofstream file(path, std::ios::binary | std::ios::trunc);
    file.write(contents.data(), static_cast<std::streamsize>(contents.size()));
  }
  // A fresh, empty engine each time: loading expects an empty cache.
  std::unique_ptr<blocksel::Engine> engine = blocksel::fuzzing::MakeFuzzEngine(false);
  (void)engine->LoadSnapshot(path);
  return 0;
}
