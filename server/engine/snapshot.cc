#include "server/engine/snapshot.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace blocksel {
namespace {

// File layout, little-endian: magic, version, model fields, the layers
// that store keys (a count, then the layers: the selecting and the audited
// ones), sequence count, then per sequence its id, lease seconds and per
// such layer the fill and that many tokens of keys; last, the CRC-32 of
// everything before it. Version 1 had no layer list: every sparse layer
// stored keys.
constexpr char kMagic[8] = {'B', 'L', 'K', 'S', 'N', 'A', 'P', '1'};
constexpr uint32_t kVersion = 2;
constexpr uint32_t kVersionWithoutGrouping = 1;

template <typename T>
void Put(std::string* out, T value) {
  out->append(reinterpret_cast<const char*>(&value), sizeof(value));
}

// Reads fixed-size fields from a buffer, remembering whether it ran short.
class Reader {
 public:
  explicit Reader(const std::string& data) : data_(data) {}
  template <typename T>
  T Get() {
    T value{};
    if (position_ + sizeof(T) > data_.size()) {
      short_ = true;
      return value;
    }
    std::memcpy(&value, data_.data() + position_, sizeof(T));
    position_ += sizeof(T);
    return value;
  }
  const uint8_t* Take(int64_t bytes) {
    if (bytes < 0 || position_ + static_cast<uint64_t>(bytes) > data_.size()) {
      short_ = true;
      return nullptr;
    }
    const auto* start = reinterpret_cast<const uint8_t*>(data_.data() + position_);
    position_ += bytes;
    return start;
  }
  bool short_read() const { return short_; }

 private:
  const std::string& data_;
  uint64_t position_ = 0;
  bool short_ = false;
};

uint32_t Checksum(const char* data, size_t size) {
  uLong crc = crc32(0L, Z_NULL, 0);
  while (size > 0) {  // zlib takes uInt lengths
    const uInt chunk = static_cast<uInt>(std::min<size_t>(size, 1u << 30));
    crc = crc32(crc, reinterpret_cast<const Bytef*>(data), chunk);
    data += chunk;
    size -= chunk;
  }
  return static_cast<uint32_t>(crc);
}

absl::Status WriteFileDurably(const std::string& path, const std::string& contents) {
  const std::string temporary = path + ".tmp";
  const int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd < 0) return absl::UnavailableError(absl::StrCat("cannot create ", temporary));
  size_t written = 0;
  while (written < contents.size()) {
    const ssize_t n = ::write(fd, contents.data() + written, contents.size() - written);
    if (n <= 0) {
      ::close(fd);
      return absl::UnavailableError(absl::StrCat("cannot write ", temporary));
    }
    written += static_cast<size_t>(n);
  }
  const bool synced = ::fsync(fd) == 0;
  ::close(fd);
  if (!synced || std::rename(temporary.c_str(), path.c_str()) != 0) {
    return absl::UnavailableError(absl::StrCat("cannot sync or rename ", temporary));
  }
  // The rename is durable once the folder is synced.
  const std::string folder = std::filesystem::path(path).parent_path().string();
  const int folder_fd = ::open(folder.empty() ? "." : folder.c_str(), O_RDONLY | O_DIRECTORY);
  if (folder_fd >= 0) {
    ::fsync(folder_fd);
    ::close(folder_fd);
  }
  return absl::OkStatus();
}

// Reads or writes the keys of tokens [0, fill) of one layer of a sequence,
// page by page.
template <typename Access>
std::vector<Access> PageAccesses(const Sequence& sequence, int32_t layer_index, int64_t fill,
                                 int64_t token_bytes, uint8_t* keys) {
  std::vector<Access> accesses;
  for (int64_t position = 0; position < fill; position += kBlockSize) {
    Access access;
    access.layer_index = layer_index;
    access.page = sequence.block_table[position / kBlockSize];
    access.first_slot = 0;
    access.num_tokens = static_cast<int32_t>(std::min<int64_t>(kBlockSize, fill - position));
    access.keys = keys + position * token_bytes;
    accesses.push_back(access);
  }
  return accesses;
}

}  // namespace

absl::StatusOr<SnapshotSummary> WriteSnapshot(const std::string& path, const ModelConfig& model,
                                              const KeyCache& cache, KeyStore* store) {
  std::string out(kMagic, sizeof(kMagic));
  Put<uint32_t>(&out, kVersion);
  Put<int32_t>(&out, model.num_layers);
  Put<int32_t>(&out, model.first_sparse_layer);
  Put<int32_t>(&out, model.head_dim);
  Put<int32_t>(&out, static_cast<int32_t>(model.key_dtype));
  const std::vector<int32_t> key_layers = model.KeyLayerList();
  Put<int32_t>(&out, static_cast<int32_t>(key_layers.size()));
  for (const int32_t layer : key_layers) Put<int32_t>(&out, layer);
  const std::vector<const Sequence*> sequences = cache.Sequences();
  Put<uint64_t>(&out, sequences.size());
  const int64_t token_bytes = model.TokenBytes();
  for (const Sequence* sequence : sequences) {
    Put<uint64_t>(&out, sequence->id);
    Put<int64_t>(&out, absl::ToInt64Seconds(sequence->lease));
    for (int32_t layer = 0; layer < model.num_key_layers(); ++layer) {
      const int64_t fill = sequence->layer_fill[layer];
      Put<int64_t>(&out, fill);
      const size_t start = out.size();
      out.resize(start + fill * token_bytes);
      auto* keys = reinterpret_cast<uint8_t*>(out.data() + start);
      absl::Status read =
          store->ReadKeys(PageAccesses<KeyRead>(*sequence, layer, fill, token_bytes, keys));
      if (!read.ok()) return read;
    }
  }
  Put<uint32_t>(&out, Checksum(out.data(), out.size()));
  absl::Status written = WriteFileDurably(path, out);
  if (!written.ok()) return written;
  return SnapshotSummary{static_cast<int64_t>(sequences.size()), static_cast<int64_t>(out.size())};
}

absl::StatusOr<SnapshotSummary> LoadSnapshot(const std::string& path, const ModelConfig& model,
                                             KeyCache* cache, absl::Time now) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat("no snapshot at ", path));
  const std::string data((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  if (data.size() < sizeof(kMagic) + 8 || std::memcmp(data.data(), kMagic, sizeof(kMagic)) != 0) {
    return absl::DataLossError(absl::StrCat(path, " is not a blocksel snapshot"));
  }
  uint32_t stored_crc;
  std::memcpy(&stored_crc, data.data() + data.size() - 4, 4);
  if (Checksum(data.data(), data.size() - 4) != stored_crc) {
    return absl::DataLossError(absl::StrCat("snapshot ", path, " is damaged (checksum mismatch)"));
  }
  Reader reader(data);
  reader.Take(sizeof(kMagic));
  const uint32_t version = reader.Get<uint32_t>();
  const int32_t num_layers = reader.Get<int32_t>();
  const int32_t first_sparse = reader.Get<int32_t>();
  const int32_t head_dim = reader.Get<int32_t>();
  const int32_t dtype = reader.Get<int32_t>();
  if (version != kVersion && version != kVersionWithoutGrouping) {
    return absl::FailedPreconditionError(absl::StrCat("snapshot ", path, " has version ", version,
                                                      ", this server reads ",
                                                      kVersionWithoutGrouping, " and ", kVersion));
  }
  if (num_layers != model.num_layers || first_sparse != model.first_sparse_layer ||
      head_dim != model.head_dim || dtype != static_cast<int32_t>(model.key_dtype)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "snapshot ", path, " was written for layers=", num_layers,
        " first_sparse_layer=", first_sparse, " head_dim=", head_dim, " key_dtype=",
        KeyDtypeName(static_cast<KeyDtype>(dtype)), "; this server has ", model.ToString()));
  }
  std::vector<int32_t> key_layers;
  if (version == kVersionWithoutGrouping) {
    key_layers = EveryKthLayer(first_sparse, num_layers, 1);
  } else {
    const int32_t count = reader.Get<int32_t>();
    if (count < 1 || count > num_layers) {
      return absl::DataLossError(
          absl::StrCat("snapshot ", path, " has a bad key-layer count ", count));
    }
    for (int32_t i = 0; i < count; ++i) key_layers.push_back(reader.Get<int32_t>());
  }
  // The keys of a layer are the same whether it selects or is audited, so
  // only the layers stored must match.
  if (key_layers != model.KeyLayerList()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "snapshot ", path, " was written for key layers ", absl::StrJoin(key_layers, ","),
        "; this server stores keys of ", absl::StrJoin(model.KeyLayerList(), ","),
        " (selecting and audited layers): start it with the grouping and audit the snapshot "
        "was written with, or without the snapshot"));
  }
  const uint64_t count = reader.Get<uint64_t>();
  std::vector<uint64_t> restored;
  auto fail = [&](absl::Status status) {
    for (uint64_t id : restored) cache->Release(id);
    return status;
  };
  const int64_t token_bytes = model.TokenBytes();
  for (uint64_t i = 0; i < count && !reader.short_read(); ++i) {
    const uint64_t id = reader.Get<uint64_t>();
    const int64_t lease_seconds = reader.Get<int64_t>();
    absl::StatusOr<uint64_t> opened = cache->Open(id, absl::Seconds(lease_seconds), now);
    if (!opened.ok() || id == 0) {
      return fail(opened.ok() ? absl::DataLossError("snapshot holds sequence id 0")
                              : opened.status());
    }
    restored.push_back(id);
    for (int32_t layer = 0; layer < model.num_key_layers(); ++layer) {
      const int64_t fill = reader.Get<int64_t>();
      if (fill < 0 || fill > model.max_positions) {
        return fail(absl::DataLossError(absl::StrCat("snapshot ", path, " has a bad fill")));
      }
      const uint8_t* keys = reader.Take(fill * token_bytes);
      if (keys == nullptr || fill == 0) continue;
      KeyRange range;
      range.sequence_id = id;
      range.first_layer_index = layer;
      range.num_tokens = fill;
      range.keys = keys;
      range.keys_size = fill * token_bytes;
      absl::Status appended = cache->Append({range}, now);
      if (!appended.ok()) return fail(appended);
    }
  }
  if (reader.short_read()) {
    return fail(absl::DataLossError(absl::StrCat("snapshot ", path, " ends early")));
  }
  return SnapshotSummary{static_cast<int64_t>(count), static_cast<int64_t>(data.size())};
}

}  // namespace blocksel
