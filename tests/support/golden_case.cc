#include "tests/support/golden_case.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include "absl/strings/escaping.h"
#include "nlohmann/json.hpp"

namespace blocksel::testing {

int32_t GoldenCase::total_rows() const {
  int32_t rows = 0;
  for (const GoldenRequest& r : requests) rows += r.q_len;
  return rows;
}

int32_t GoldenCase::tokens_per_request() const {
  return requests.empty() ? 1 : requests.front().q_len;
}

std::vector<int32_t> GoldenCase::ExpectedBatch() const {
  const int32_t rows = total_rows();
  std::vector<int32_t> out(static_cast<size_t>(shape.num_heads) * rows * shape.topk);
  int32_t first_row = 0;
  for (const GoldenRequest& r : requests) {
    for (int32_t head = 0; head < shape.num_heads; ++head) {
      std::copy_n(r.expected.begin() + static_cast<int64_t>(head) * r.q_len * shape.topk,
                  r.q_len * shape.topk,
                  out.begin() + (static_cast<int64_t>(head) * rows + first_row) * shape.topk);
    }
    first_row += r.q_len;
  }
  return out;
}

std::vector<std::string> GoldenFiles() {
  // BLOCKSEL_GOLDEN_DIR in the environment wins: a test binary copied to
  // another machine (the GPU machine) finds the cases there.
  const char* override_dir = std::getenv("BLOCKSEL_GOLDEN_DIR");
  const std::string dir = override_dir != nullptr ? override_dir : BLOCKSEL_GOLDEN_DIR;
  std::vector<std::string> files;
  for (const auto& entry : std::filesystem::directory_iterator(dir)) {
    if (entry.path().extension() == ".json") files.push_back(entry.path().string());
  }
  std::sort(files.begin(), files.end());
  return files;
}

GoldenCase LoadGoldenCase(const std::string& path) {
  std::ifstream file(path);
  const nlohmann::json json = nlohmann::json::parse(file);
  GoldenCase golden;
  golden.name = json.at("name").get<std::string>();
  golden.decode = json.at("mode").get<std::string>() == "decode";
  golden.shape.num_heads = json.at("H").get<int32_t>();
  golden.shape.head_dim = json.at("D").get<int32_t>();
  golden.shape.topk = json.at("topk").get<int32_t>();
  golden.shape.init_blocks = json.at("init_blocks").get<int32_t>();
  golden.shape.local_blocks = json.at("local_blocks").get<int32_t>();
  golden.shape.key_dtype =
      json.at("key_dtype").get<std::string>() == "bf16" ? KeyDtype::kBf16 : KeyDtype::kFp8E4m3;
  for (const nlohmann::json& r : json.at("requests")) {
    GoldenRequest request;
    request.seq_len = r.at("seq_len").get<int64_t>();
    request.prefix_len = r.at("prefix_len").get<int64_t>();
    request.q_len = r.at("q_len").get<int32_t>();
    if (!absl::Base64Unescape(r.at("keys").get<std::string>(), &request.keys) ||
        !absl::Base64Unescape(r.at("queries").get<std::string>(), &request.queries)) {
      throw std::runtime_error("bad base64 in " + path);
    }
    for (const auto& head : r.at("expected")) {
      for (const auto& row : head) {
        for (const auto& id : row) request.expected.push_back(id.get<int32_t>());
      }
    }
    golden.requests.push_back(std::move(request));
  }
  return golden;
}

}  // namespace blocksel::testing
