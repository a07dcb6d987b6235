// blocksel-demo: the per-layer flow of an attention worker against a running
// server, with every selection checked against the float64 reference.
//
//   1. GetInfo, open two sequences, stream their prompt keys for all sparse
//      layers (the bulk append path).
//   2. One prefill chunk per sequence on the first sparse layer.
//   3. Decode steps over a StreamSelect session: for each sparse layer, one
//      message appends the new token's keys and selects (B=2 plus a padding
//      request).
#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "client/blocksel_client.h"
#include "client/encoding.h"
#include "client/layer_groups.h"
#include "client/reference_selection.h"

ABSL_FLAG(std::string, server, "localhost:50051", "Server address (host:port or unix:/path)");
ABSL_FLAG(int, prompt_tokens, 2500, "Prompt length of the first sequence");
ABSL_FLAG(int, decode_steps, 3, "Decode steps (each runs every sparse layer)");
ABSL_FLAG(uint64_t, seed, 7, "Random seed");
ABSL_FLAG(int, wait_seconds, 10, "How long to wait for the server to answer");

namespace blocksel {
namespace {

struct DemoSequence {
  uint64_t id = 0;
  int64_t length = 0;
  std::vector<std::vector<float>> layer_keys;  // decoded values, per sparse layer
};

class Demo {
 public:
  Demo(BlockselClient* client, const v1::ModelConfig& model, uint64_t seed)
      : client_(client),
        model_(model),
        selecting_(ReusingSelectingLayers(model)),
        audited_(model.audited_layers().begin(), model.audited_layers().end()),
        random_(seed) {
    shape_.num_heads = static_cast<int32_t>(model.num_heads());
    shape_.head_dim = static_cast<int32_t>(model.head_dim());
    shape_.topk = static_cast<int32_t>(model.topk());
    shape_.init_blocks = static_cast<int32_t>(model.init_blocks());
    shape_.local_blocks = static_cast<int32_t>(model.local_blocks());
  }

  int sparse_layers() const {
    return static_cast<int>(model_.num_layers() - model_.first_sparse_layer());
  }

  // The model layer of sparse layer l (counted from the first sparse layer).
  int64_t Layer(int l) const { return model_.first_sparse_layer() + l; }
  bool Selects(int l) const { return SelectionSourceOf(selecting_, Layer(l)) == Layer(l); }
  // Whether the server stores keys of sparse layer l: it selects or is
  // audited.
  bool StoresKeys(int l) const {
    return Selects(l) || std::find(audited_.begin(), audited_.end(), Layer(l)) != audited_.end();
  }

  int selecting_layers() const {
    int count = 0;
    for (int l = 0; l < sparse_layers(); ++l) count += Selects(l) ? 1 : 0;
    return count;
  }

  // Random keys for tokens of one layer, returned encoded; their decoded
  // values are appended to the sequence's copy.
  std::string NewKeys(DemoSequence& sequence, int layer_index, int64_t tokens) {
    std::vector<float> values(tokens * model_.head_dim());
    for (float& v : values) v = normal_(random_);
    std::string encoded = EncodeKeys(values, model_.key_dtype());
    std::vector<float> decoded = DecodeKeys(encoded, model_.key_dtype());
    auto& keys = sequence.layer_keys[layer_index];
    keys.insert(keys.end(), decoded.begin(), decoded.end());
    return encoded;
  }

  std::string NewQueries(int64_t rows, std::vector<float>* decoded) {
    std::vector<float> values(rows * model_.num_heads() * model_.head_dim());
    for (float& v : values) v = normal_(random_);
    std::string encoded = EncodeBf16(values);
    *decoded = DecodeBf16(encoded);
    return encoded;
  }

  absl::Status OpenAndFill(DemoSequence& sequence, int64_t tokens) {
    absl::StatusOr<uint64_t> id = client_->OpenSequence();
    if (!id.ok()) return id.status();
    sequence.id = *id;
    sequence.layer_keys.resize(sparse_layers());
    std::vector<v1::AppendKeysRequest> requests;
    constexpr int64_t kChunk = 1024;
    for (int64_t start = 0; start < tokens; start += kChunk) {
      const int64_t count = std::min(kChunk, tokens - start);
      v1::AppendKeysRequest request;
      // Keys for the selecting and audited layers only (the others store
      // none), one append per run of consecutive such layers.
      for (int first = 0; first < sparse_layers();) {
        int end = first;
        while (end < sparse_layers() && StoresKeys(end)) ++end;
        if (end > first) {
          v1::KeyAppend* append = request.add_appends();
          append->set_sequence_id(sequence.id);
          append->set_first_layer(model_.first_sparse_layer() + first);
          append->set_num_layers(end - first);
          append->set_start_position(start);
          append->set_num_tokens(static_cast<uint32_t>(count));
          std::string keys;
          for (int l = first; l < end; ++l) keys += NewKeys(sequence, l, count);
          append->set_keys(std::move(keys));
        }
        first = end == first ? first + 1 : end;
      }
      requests.push_back(std::move(request));
    }
    absl::StatusOr<uint64_t> appended = client_->StreamAppendKeys(requests);
    if (!appended.ok()) return appended.status();
    sequence.length = tokens;
    std::printf(
        "sequence %llu: %lld prompt tokens x %d selecting and %zu audited layers appended (%llu "
        "keys)\n",
        static_cast<unsigned long long>(sequence.id), static_cast<long long>(tokens),
        selecting_layers(), audited_.size(), static_cast<unsigned long long>(*appended));
    return absl::OkStatus();
  }

  // Compares a result with the reference; prints the first rows.
  bool Check(const char* what, const SelectResult& result, const std::vector<ReferenceRows>& rows,
             const std::vector<float>& queries, bool print) {
    const std::vector<int32_t> expected = ReferenceSelect(shape_, rows, queries.data());
    const bool match = result.block_ids == expected;
    if (print) {
      for (int32_t row = 0; row < std::min(result.total_q, 3); ++row) {
        std::vector<int32_t> ids(result.block_ids.begin() + row * result.topk,
                                 result.block_ids.begin() + (row + 1) * result.topk);
        std::printf("  %s row %d head 0: [%s]\n", what, row, absl::StrJoin(ids, " ").c_str());
      }
    }
    std::printf("%s: %d rows x %d heads %s the reference\n", what, result.total_q, result.num_heads,
                match ? "match" : "DO NOT match");
    return match;
  }

  bool Prefill(DemoSequence& sequence, int64_t chunk) {
    v1::SelectRequest request;
    request.set_request_id(1);
    request.set_layer(model_.first_sparse_layer());
    v1::PrefillRequest* prefill = request.mutable_prefill()->add_requests();
    prefill->set_sequence_id(sequence.id);
    prefill->set_prefix_len(sequence.length - chunk);
    prefill->set_q_len(static_cast<uint32_t>(chunk));
    std::vector<float> queries;
    request.set_queries(NewQueries(chunk, &queries));
    absl::StatusOr<SelectResult> result = client_->Select(request);
    if (!result.ok()) {
      std::printf("prefill failed: %s\n", result.status().ToString().c_str());
      return false;
    }
    ReferenceRows rows{sequence.layer_keys[0].data(), sequence.length - chunk,
                       static_cast<int32_t>(chunk)};
    return Check("prefill (unary Select)", *result, {rows}, queries, true);
  }

  bool Decode(std::vector<DemoSequence>& sequences, int steps) {
    absl::StatusOr<std::unique_ptr<SelectSession>> session = client_->StartSelectSession();
    if (!session.ok()) return false;
    bool all_match = true;
    uint64_t request_id = 100;
    for (int step = 0; step < steps; ++step) {
      int matched_layers = 0;
      // Each layer's block ids this step: a layer that reuses another's
      // selection must get exactly that layer's ids.
      std::vector<std::vector<int32_t>> step_ids(sparse_layers());
      for (int l = 0; l < sparse_layers(); ++l) {
        v1::SelectRequest request;
        request.set_request_id(++request_id);
        request.set_layer(model_.first_sparse_layer() + l);
        v1::DecodeBatch* batch = request.mutable_decode();
        batch->set_tokens_per_request(1);
        std::vector<ReferenceRows> rows;
        for (DemoSequence& sequence : sequences) {
          v1::DecodeRequest* decode = batch->add_requests();
          decode->set_sequence_id(sequence.id);
          decode->set_seq_len(sequence.length + 1);
          decode->set_keys(NewKeys(sequence, l, 1));
          rows.push_back({sequence.layer_keys[l].data(), sequence.length, 1});
        }
        batch->add_requests()->set_seq_len(0);  // a padding slot of the batch
        rows.push_back({nullptr, -1, 1});
        std::vector<float> queries;
        request.set_queries(NewQueries(static_cast<int64_t>(rows.size()), &queries));
        absl::StatusOr<SelectResult> result = (*session)->Call(request);
        if (!result.ok()) {
          std::printf("decode failed: %s\n", result.status().ToString().c_str());
          return false;
        }
        const std::vector<int32_t> expected =
            Selects(l) ? ReferenceSelect(shape_, rows, queries.data())
                       : step_ids[SelectionSourceOf(selecting_, Layer(l)) - Layer(0)];
        step_ids[l] = result->block_ids;
        if (result->block_ids == expected) {
          ++matched_layers;
        } else {
          all_match = false;
        }
        if (l == 0 && step == 0) Check("decode step 0 layer 0", *result, rows, queries, true);
      }
      for (DemoSequence& sequence : sequences) ++sequence.length;
      std::printf(
          "decode step %d (StreamSelect, append+select): %d of %d layers match "
          "the reference (%d of them reuse a selection, answered without a round trip; %zu "
          "of those also sent to the server as audits)\n",
          step, matched_layers, sparse_layers(), sparse_layers() - selecting_layers(),
          audited_.size());
    }
    return (*session)->Close().ok() && all_match;
  }

 private:
  BlockselClient* client_;
  v1::ModelConfig model_;
  const std::vector<int32_t> selecting_;  // empty: every sparse layer selects
  const std::vector<int32_t> audited_;
  SelectionShape shape_;
  std::mt19937_64 random_;
  std::normal_distribution<float> normal_;
};

int Run() {
  BlockselClient client(absl::GetFlag(FLAGS_server));
  const absl::Time give_up = absl::Now() + absl::Seconds(absl::GetFlag(FLAGS_wait_seconds));
  absl::StatusOr<v1::GetInfoResponse> info = client.GetInfo();
  while (absl::IsUnavailable(info.status()) && absl::Now() < give_up) {
    absl::SleepFor(absl::Milliseconds(200));
    info = client.GetInfo();
  }
  if (!info.ok()) {
    std::printf("cannot reach %s: %s\n", absl::GetFlag(FLAGS_server).c_str(),
                info.status().ToString().c_str());
    return 1;
  }
  const v1::ModelConfig& model = info->model();
  std::printf(
      "server %s, backend %s (%s): layers %u (sparse from %u), H=%u, D=%u, %s keys, "
      "topk=%u, init=%u, local=%u; cache %llu pages\n",
      info->server_version().c_str(), info->backend().c_str(), info->backend_detail().c_str(),
      model.num_layers(), model.first_sparse_layer(), model.num_heads(), model.head_dim(),
      v1::KeyDtype_Name(model.key_dtype()).c_str(), model.topk(), model.init_blocks(),
      model.local_blocks(), static_cast<unsigned long long>(info->cache().total_pages()));
  Demo demo(&client, model, absl::GetFlag(FLAGS_seed));
  std::vector<DemoSequence> sequences(2);
  const int64_t prompt = absl::GetFlag(FLAGS_prompt_tokens);
  for (int i = 0; i < 2; ++i) {
    absl::Status filled = demo.OpenAndFill(sequences[i], i == 0 ? prompt : prompt / 2 + 77);
    if (!filled.ok()) {
      std::printf("append failed: %s\n", filled.ToString().c_str());
      return 1;
    }
  }
  bool ok = demo.Prefill(sequences[0], std::min<int64_t>(512, prompt));
  ok = demo.Decode(sequences, absl::GetFlag(FLAGS_decode_steps)) && ok;
  for (const DemoSequence& sequence : sequences) {
    absl::StatusOr<bool> released = client.ReleaseSequence(sequence.id);
    ok = ok && released.ok() && *released;
  }
  std::printf("%s\n", ok ? "demo OK: every selection matches the reference" : "demo FAILED");
  return ok ? 0 : 1;
}

}  // namespace
}  // namespace blocksel

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("Runs a prefill and decode demo against blocksel-server.");
  absl::ParseCommandLine(argc, argv);
  return blocksel::Run();
}
