#include "client/routed_client.h"

#include <algorithm>
#include <thread>
#include <utility>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"

namespace blocksel {
namespace {

// SplitMix64's finalizer: a fixed, well-mixed 64-bit hash, the same in
// every process and build (std::hash promises neither).
uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// FNV-1a over the target's bytes.
uint64_t HashTarget(const std::string& target) {
  uint64_t hash = 0xcbf29ce484222325ull;
  for (unsigned char c : target) hash = (hash ^ c) * 0x100000001b3ull;
  return hash;
}

// Query rows of request i of the batch.
int64_t RowsOf(const v1::SelectRequest& request, int i) {
  if (request.has_prefill()) return request.prefill().requests(i).q_len();
  const v1::DecodeBatch& decode = request.decode();
  const int64_t batch_q = decode.tokens_per_request() == 0 ? 1 : decode.tokens_per_request();
  const uint32_t own_q = decode.requests(i).query_tokens();
  return own_q == 0 ? batch_q : own_q;
}

uint64_t SequenceOf(const v1::SelectRequest& request, int i) {
  return request.has_prefill() ? request.prefill().requests(i).sequence_id()
                               : request.decode().requests(i).sequence_id();
}

// The share of a batch one server gets, and where its rows go back.
struct Part {
  bool used = false;
  v1::SelectRequest request;
  // (first row in the batch, rows), in the part's row order.
  std::vector<std::pair<int64_t, int64_t>> row_ranges;
  absl::StatusOr<SelectResult> result = absl::UnknownError("not run");
};

}  // namespace

size_t RendezvousOwner(absl::Span<const std::string> targets, uint64_t sequence_id) {
  size_t best = 0;
  uint64_t best_weight = 0;
  const uint64_t id_hash = Mix(sequence_id);
  for (size_t i = 0; i < targets.size(); ++i) {
    const uint64_t weight = Mix(HashTarget(targets[i]) ^ id_hash);
    if (i == 0 || weight > best_weight) {
      best = i;
      best_weight = weight;
    }
  }
  return best;
}

RoutedClient::RoutedClient(std::vector<std::string> targets, ClientOptions options)
    : targets_(std::move(targets)) {
  for (const std::string& target : targets_) {
    clients_.push_back(std::make_unique<BlockselClient>(target, options));
  }
}

size_t RoutedClient::ServerFor(uint64_t sequence_id) const {
  return RendezvousOwner(targets_, sequence_id);
}

absl::StatusOr<uint64_t> RoutedClient::OpenSequence(uint64_t sequence_id, uint32_t lease_seconds) {
  if (sequence_id == 0) {
    thread_local absl::BitGen random;
    while (sequence_id == 0) sequence_id = absl::Uniform<uint64_t>(random);
  }
  return clients_[ServerFor(sequence_id)]->OpenSequence(sequence_id, lease_seconds);
}

absl::StatusOr<bool> RoutedClient::ReleaseSequence(uint64_t sequence_id) {
  return clients_[ServerFor(sequence_id)]->ReleaseSequence(sequence_id);
}

absl::StatusOr<uint64_t> RoutedClient::AppendKeys(const v1::AppendKeysRequest& request) {
  std::vector<v1::AppendKeysRequest> parts(clients_.size());
  for (const v1::KeyAppend& append : request.appends()) {
    *parts[ServerFor(append.sequence_id())].add_appends() = append;
  }
  uint64_t tokens = 0;
  for (size_t s = 0; s < parts.size(); ++s) {
    if (parts[s].appends().empty()) continue;
    absl::StatusOr<uint64_t> appended = clients_[s]->AppendKeys(parts[s]);
    if (!appended.ok()) return appended.status();
    tokens += *appended;
  }
  return tokens;
}

absl::StatusOr<SelectResult> RoutedClient::Select(const v1::SelectRequest& request) {
  const int num_requests = request.has_prefill()  ? request.prefill().requests_size()
                           : request.has_decode() ? request.decode().requests_size()
                                                  : 0;
  int64_t total_rows = 0;
  for (int i = 0; i < num_requests; ++i) total_rows += RowsOf(request, i);
  if (total_rows == 0 || request.queries().size() % total_rows != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("the batch has ", total_rows, " query rows and ", request.queries().size(),
                     " bytes of queries; expected a whole number of bytes per row"));
  }
  const int64_t row_bytes = static_cast<int64_t>(request.queries().size()) / total_rows;

  // Every part starts from the batch without its requests and queries,
  // which are split (copied from the batch once, not once per server).
  v1::SelectRequest header = request;
  header.clear_queries();
  header.set_layout(v1::BLOCK_ID_LAYOUT_HEAD_MAJOR);
  if (header.has_prefill()) header.mutable_prefill()->clear_requests();
  if (header.has_decode()) header.mutable_decode()->clear_requests();

  std::vector<Part> parts(clients_.size());
  int64_t row = 0;
  for (int i = 0; i < num_requests; ++i) {
    Part& part = parts[ServerFor(SequenceOf(request, i))];
    if (!part.used) {
      part.used = true;
      part.request = header;
    }
    if (request.has_prefill()) {
      *part.request.mutable_prefill()->add_requests() = request.prefill().requests(i);
    } else {
      *part.request.mutable_decode()->add_requests() = request.decode().requests(i);
    }
    const int64_t rows = RowsOf(request, i);
    part.request.mutable_queries()->append(request.queries(), row * row_bytes, rows * row_bytes);
    part.row_ranges.emplace_back(row, rows);
    row += rows;
  }

  // One thread per extra server; the first part runs here.
  std::vector<std::thread> threads;
  Part* first = nullptr;
  for (size_t s = 0; s < parts.size(); ++s) {
    if (!parts[s].used) continue;
    if (first == nullptr) {
      first = &parts[s];
      continue;
    }
    threads.emplace_back(
        [this, s, &parts] { parts[s].result = clients_[s]->Select(parts[s].request); });
  }
  first->result = clients_[first - parts.data()]->Select(first->request);
  for (std::thread& thread : threads) thread.join();

  SelectResult merged;
  merged.request_id = request.request_id();
  merged.total_q = static_cast<int32_t>(total_rows);
  merged.layout = v1::BLOCK_ID_LAYOUT_HEAD_MAJOR;
  for (const Part& part : parts) {
    if (!part.used) continue;
    if (!part.result.ok()) return part.result.status();
    const SelectResult& result = *part.result;
    if (merged.block_ids.empty()) {
      merged.num_heads = result.num_heads;
      merged.topk = result.topk;
      merged.block_ids.assign(static_cast<size_t>(result.num_heads) * total_rows * result.topk, -1);
    }
    int64_t part_row = 0;
    for (const auto& [batch_row, rows] : part.row_ranges) {
      for (int32_t head = 0; head < result.num_heads; ++head) {
        std::copy_n(result.block_ids.begin() + (head * result.total_q + part_row) * result.topk,
                    rows * result.topk,
                    merged.block_ids.begin() + (head * total_rows + batch_row) * merged.topk);
      }
      part_row += rows;
    }
  }
  return merged;
}

}  // namespace blocksel
