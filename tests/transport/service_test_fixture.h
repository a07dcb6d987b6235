// The fixture of the in-process gRPC tests: a real BlockselServer on a
// loopback port, driven through the client library (and, where the library
// hides a detail such as the request_id of an in-band error, a raw stub).
#ifndef BLOCKSEL_TESTS_TRANSPORT_SERVICE_TEST_FIXTURE_H_
#define BLOCKSEL_TESTS_TRANSPORT_SERVICE_TEST_FIXTURE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "blocksel/v1/block_selector.grpc.pb.h"
#include "client/blocksel_client.h"
#include "client/encoding.h"
#include "client/reference_selection.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "gtest/gtest.h"
#include "server/blocksel_server.h"
#include "tests/support/test_model.h"

namespace blocksel::testing {

inline constexpr int64_t kPages = 24;
inline constexpr int32_t kFirstSparseLayer = kTestFirstSparseLayer;
inline constexpr int64_t kMaxMessageBytes = 1 << 20;  // the smallest the server allows
inline constexpr absl::Duration kWaitLimit = absl::Seconds(10);

using Encoded = EncodedBf16;

class GrpcServiceTest : public ::testing::Test {
 protected:
  // Lets a derived fixture change the server's configuration.
  virtual void Configure(ServerConfig* /*config*/) {}

  void SetUp() override {
    model_ = SmallTestModel();
    ServerConfig config;
    config.model = model_;
    config.backend.kind = "cpu";
    config.backend.cpu_threads = 1;
    config.cache_bytes = kPages * model_.PageBytes();
    config.max_sequences = 16;
    config.default_lease = absl::Minutes(10);
    config.max_lease = absl::Hours(1);
    config.listen_addresses = {"127.0.0.1:0"};
    config.metrics_address = "";  // metrics recorded, not served
    config.max_message_bytes = kMaxMessageBytes;
    config.max_inflight_per_stream = 4;
    Configure(&config);
    absl::StatusOr<std::unique_ptr<BlockselServer>> server = BlockselServer::Start(config);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    ASSERT_GT(server_->port(), 0);
    target_ = absl::StrCat("127.0.0.1:", server_->port());
    ClientOptions options;
    options.timeout = kWaitLimit;
    client_ = std::make_unique<BlockselClient>(target_, options);
  }

  void TearDown() override {
    client_.reset();
    // Idempotent cleanup: a test may have shut the server down already.
    if (server_ != nullptr) server_->Shutdown(absl::ZeroDuration()).IgnoreError();
  }

  Encoded RandomBf16(int64_t count) { return ::blocksel::testing::RandomBf16(random_, count); }
  Encoded RandomKeys(int64_t tokens) { return RandomBf16(tokens * model_.head_dim); }
  Encoded RandomQueries(int64_t rows) {
    return RandomBf16(rows * model_.num_heads * model_.head_dim);
  }

  uint64_t Open(uint64_t id = 0) {
    absl::StatusOr<uint64_t> opened = client_->OpenSequence(id);
    EXPECT_TRUE(opened.ok()) << opened.status();
    return opened.ok() ? *opened : 0;
  }

  // Records keys the server accepted, as it decoded them.
  void Remember(uint64_t sequence, int32_t layer, int64_t start, const std::vector<float>& values) {
    std::vector<float>& keys = keys_[{sequence, layer}];
    keys.resize(start * model_.head_dim + values.size());
    std::copy(values.begin(), values.end(), keys.begin() + start * model_.head_dim);
  }
  const float* KeysOf(uint64_t sequence, int32_t layer) { return keys_[{sequence, layer}].data(); }

  // One append of random keys; the caller remembers them once accepted.
  v1::KeyAppend MakeAppend(uint64_t sequence, int32_t layer, int64_t start, int64_t tokens,
                           Encoded* keys) {
    *keys = RandomKeys(tokens);
    v1::KeyAppend append;
    append.set_sequence_id(sequence);
    append.set_first_layer(layer);
    append.set_start_position(start);
    append.set_num_tokens(static_cast<uint32_t>(tokens));
    append.set_keys(keys->bytes);
    return append;
  }

  absl::Status AppendRandom(uint64_t sequence, int32_t layer, int64_t start, int64_t tokens) {
    Encoded keys;
    v1::AppendKeysRequest request;
    *request.add_appends() = MakeAppend(sequence, layer, start, tokens, &keys);
    absl::StatusOr<uint64_t> appended = client_->AppendKeys(request);
    if (!appended.ok()) return appended.status();
    EXPECT_EQ(*appended, static_cast<uint64_t>(tokens));
    Remember(sequence, layer, start, keys.values);
    return absl::OkStatus();
  }

  // A decode batch (Q = 1) of the given sequences at their seq_lens, with
  // fresh random queries, and the oracle's answer for it.
  struct Batch {
    v1::SelectRequest request;
    std::vector<int32_t> expected;
  };
  Batch Decode(uint64_t request_id, int32_t layer,
               const std::vector<std::pair<uint64_t, int64_t>>& sequences) {
    Batch batch;
    batch.request.set_request_id(request_id);
    batch.request.set_layer(layer);
    std::vector<ReferenceRows> rows;
    for (const auto& [sequence, seq_len] : sequences) {
      v1::DecodeRequest* decode = batch.request.mutable_decode()->add_requests();
      decode->set_sequence_id(sequence);
      decode->set_seq_len(seq_len);
      rows.push_back({KeysOf(sequence, layer), seq_len - 1, 1});
    }
    Encoded queries = RandomQueries(static_cast<int64_t>(sequences.size()));
    batch.request.set_queries(queries.bytes);
    batch.expected = ReferenceSelect(model_.shape(), rows, queries.values.data());
    return batch;
  }

  // A prefill of the first `rows` tokens of `sequence` in the first sparse
  // layer, with fresh random queries; no reference answer (for tests of
  // the transport, not of the selection).
  v1::SelectRequest FirstTokensPrefill(uint64_t sequence, int64_t rows) {
    v1::SelectRequest request;
    request.set_layer(kFirstSparseLayer);
    v1::PrefillRequest* prefill = request.mutable_prefill()->add_requests();
    prefill->set_sequence_id(sequence);
    prefill->set_prefix_len(0);
    prefill->set_q_len(static_cast<uint32_t>(rows));
    request.set_queries(RandomQueries(rows).bytes);
    return request;
  }

  absl::StatusOr<v1::GetInfoResponse> Info() { return client_->GetInfo(); }
  int64_t FreePages() {
    absl::StatusOr<v1::GetInfoResponse> info = Info();
    EXPECT_TRUE(info.ok()) << info.status();
    return info.ok() ? static_cast<int64_t>(info->cache().free_pages()) : -1;
  }

  std::unique_ptr<v1::BlockSelector::Stub> RawStub() {
    return v1::BlockSelector::NewStub(
        grpc::CreateChannel(target_, grpc::InsecureChannelCredentials()));
  }

  ModelConfig model_;
  std::unique_ptr<BlockselServer> server_;
  std::string target_;
  std::unique_ptr<BlockselClient> client_;
  std::mt19937_64 random_{8675309};
  std::map<std::pair<uint64_t, int32_t>, std::vector<float>> keys_;
};

}  // namespace blocksel::testing

#endif  // BLOCKSEL_TESTS_TRANSPORT_SERVICE_TEST_FIXTURE_H_
