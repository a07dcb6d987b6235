// The client library against real in-process servers: retries, and routing
// over several servers.
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/async_select_session.h"
#include "client/blocksel_client.h"
#include "client/reference_selection.h"
#include "client/routed_client.h"
#include "gtest/gtest.h"
#include "server/blocksel_server.h"
#include "tests/support/test_model.h"

namespace blocksel {
namespace {

constexpr int32_t kLayer = testing::kTestFirstSparseLayer;

std::unique_ptr<BlockselServer> StartServer(const std::string& address,
                                            std::vector<int32_t> selecting_layers = {},
                                            std::vector<int32_t> audited_layers = {}) {
  ServerConfig config;
  config.model = testing::SmallTestModel();
  config.model.selecting_layers = std::move(selecting_layers);
  config.model.audited_layers = std::move(audited_layers);
  config.backend.kind = "cpu";
  config.backend.cpu_threads = 1;
  config.cache_bytes = 64 * config.model.PageBytes();
  config.listen_addresses = {address};
  config.metrics_address = "";  // metrics recorded, not served
  absl::StatusOr<std::unique_ptr<BlockselServer>> server = BlockselServer::Start(config);
  EXPECT_TRUE(server.ok()) << server.status();
  return server.ok() ? std::move(*server) : nullptr;
}

// A fresh unix socket address (no file left from an earlier run).
std::string SocketAddress(const std::string& name) {
  const std::filesystem::path path = std::filesystem::temp_directory_path() /
                                     absl::StrCat("blocksel_", ::getpid(), "_", name, ".sock");
  std::filesystem::remove(path);
  return absl::StrCat("unix:", path.string());
}

// The server comes up 300 ms after the first call: a retried call waits it
// out, OpenSequence (never retried) fails at once.
TEST(ClientRetryTest, IdempotentCallsRetryUntilTheServerIsUp) {
  const std::string address = SocketAddress("retry");
  ClientOptions options;
  options.max_attempts = 12;
  options.initial_backoff = absl::Milliseconds(50);
  options.max_backoff = absl::Milliseconds(200);
  options.timeout = absl::Seconds(10);
  BlockselClient retried(address, options);
  BlockselClient opener(address, options);
  std::unique_ptr<BlockselServer> server;
  std::thread starter([&] {
    absl::SleepFor(absl::Milliseconds(300));
    server = StartServer(address);
  });
  EXPECT_EQ(opener.OpenSequence(5).status().code(), absl::StatusCode::kUnavailable);
  absl::StatusOr<v1::GetInfoResponse> info = retried.GetInfo();
  starter.join();
  EXPECT_TRUE(info.ok()) << info.status();
}

TEST(RendezvousTest, RemovingAServerMovesOnlyItsSequences) {
  const std::vector<std::string> four = {"a:1", "b:1", "c:1", "d:1"};
  const std::vector<std::string> without_c = {"a:1", "b:1", "d:1"};
  std::map<std::string, int> owned;
  for (uint64_t id = 1; id <= 10000; ++id) {
    const std::string& owner = four[RendezvousOwner(four, id)];
    ++owned[owner];
    const std::string& after = without_c[RendezvousOwner(without_c, id)];
    if (owner != "c:1") {
      EXPECT_EQ(after, owner) << "sequence " << id;
    }
  }
  for (const std::string& target : four) {
    EXPECT_GT(owned[target], 2000) << target;  // about 2500 each
    EXPECT_LT(owned[target], 3000) << target;
  }
}

TEST(RoutedClientTest, SequencesLiveOnTheirOwnerAndBatchesSpanServers) {
  std::vector<std::string> addresses;
  std::vector<std::unique_ptr<BlockselServer>> servers;
  for (int i = 0; i < 3; ++i) {
    addresses.push_back(SocketAddress(absl::StrCat("routed", i)));
    servers.push_back(StartServer(addresses.back()));
    ASSERT_NE(servers.back(), nullptr);
  }
  RoutedClient client(addresses);
  const ModelConfig model = testing::SmallTestModel();
  std::mt19937_64 random(99);

  constexpr int kSequences = 12;
  std::vector<uint64_t> ids;
  std::vector<int64_t> lengths;
  std::vector<std::vector<float>> keys;
  v1::AppendKeysRequest append;
  std::vector<int> per_server(addresses.size(), 0);
  for (int i = 0; i < kSequences; ++i) {
    absl::StatusOr<uint64_t> id = client.OpenSequence();
    ASSERT_TRUE(id.ok()) << id.status();
    ids.push_back(*id);
    ++per_server[client.ServerFor(*id)];
    lengths.push_back(200 + 90 * i);
    testing::EncodedBf16 encoded = testing::RandomBf16(random, lengths.back() * model.head_dim);
    keys.push_back(encoded.values);
    v1::KeyAppend* keys_append = append.add_appends();
    keys_append->set_sequence_id(*id);
    keys_append->set_first_layer(kLayer);
    keys_append->set_num_tokens(static_cast<uint32_t>(lengths.back()));
    keys_append->set_keys(encoded.bytes);
  }
  absl::StatusOr<uint64_t> appended = client.AppendKeys(append);
  ASSERT_TRUE(appended.ok()) << appended.status();
  for (size_t s = 0; s < addresses.size(); ++s) {
    absl::StatusOr<v1::GetInfoResponse> info = client.server(s).GetInfo();
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->cache().open_sequences(), static_cast<uint64_t>(per_server[s]));
  }

  // One decode batch over every sequence (Q = 2) plus a padding request.
  constexpr int32_t kQ = 2;
  v1::SelectRequest select;
  select.set_request_id(7);
  select.set_layer(kLayer);
  select.set_layout(v1::BLOCK_ID_LAYOUT_TOKEN_MAJOR);  // answered head-major
  select.mutable_decode()->set_tokens_per_request(kQ);
  std::vector<ReferenceRows> rows;
  for (int i = 0; i < kSequences; ++i) {
    v1::DecodeRequest* decode = select.mutable_decode()->add_requests();
    decode->set_sequence_id(ids[i]);
    decode->set_seq_len(lengths[i]);
    rows.push_back({keys[i].data(), lengths[i] - kQ, kQ});
    if (i == 4) {
      select.mutable_decode()->add_requests()->set_seq_len(0);
      rows.push_back({nullptr, -kQ, kQ});
    }
  }
  testing::EncodedBf16 queries =
      testing::RandomBf16(random, (kSequences + 1) * kQ * model.num_heads * model.head_dim);
  select.set_queries(queries.bytes);
  absl::StatusOr<SelectResult> result = client.Select(select);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->request_id, 7u);
  EXPECT_EQ(result->layout, v1::BLOCK_ID_LAYOUT_HEAD_MAJOR);
  EXPECT_EQ(result->block_ids, ReferenceSelect(model.shape(), rows, queries.values.data()));
  int used = 0;
  for (int count : per_server) used += count > 0 ? 1 : 0;
  EXPECT_GT(used, 1) << "the batch should span servers";
}

// Random keys for `tokens` positions of `layer`, appended; returns them.
absl::StatusOr<testing::EncodedBf16> AppendRandomKeys(BlockselClient& client, uint64_t id,
                                                      int32_t layer, uint32_t tokens,
                                                      std::mt19937_64& random) {
  testing::EncodedBf16 keys =
      testing::RandomBf16(random, int64_t{tokens} * testing::SmallTestModel().head_dim);
  v1::AppendKeysRequest append;
  v1::KeyAppend* key_append = append.add_appends();
  key_append->set_sequence_id(id);
  key_append->set_first_layer(layer);
  key_append->set_num_tokens(tokens);
  key_append->set_keys(keys.bytes);
  const absl::StatusOr<uint64_t> appended = client.AppendKeys(append);
  if (!appended.ok()) return appended.status();
  return keys;
}

// A decode batch of one row: sequence id's last token at seq_len.
v1::SelectRequest OneRowDecode(uint64_t request_id, int32_t layer, uint64_t id, uint64_t seq_len,
                               const testing::EncodedBf16& queries) {
  v1::SelectRequest request;
  request.set_request_id(request_id);
  request.set_layer(layer);
  v1::DecodeRequest* decode = request.mutable_decode()->add_requests();
  decode->set_sequence_id(id);
  decode->set_seq_len(seq_len);
  request.set_queries(queries.bytes);
  return request;
}

// Sparse layers 1 and 3 select, layer 2 reuses layer 1: the session
// answers layer 2 from layer 1's selection without sending it.
TEST(SelectSessionTest, AReusingLayerGetsTheSelectionItReusesWithoutARoundTrip) {
  const std::string address = SocketAddress("reuse");
  std::unique_ptr<BlockselServer> server = StartServer(address, {1, 3});
  ASSERT_NE(server, nullptr);
  BlockselClient client(address);
  const ModelConfig model = testing::SmallTestModel();
  std::mt19937_64 random(7);
  absl::StatusOr<uint64_t> id = client.OpenSequence();
  ASSERT_TRUE(id.ok()) << id.status();
  std::map<int32_t, testing::EncodedBf16> keys;
  for (const int32_t layer : {1, 3}) {
    absl::StatusOr<testing::EncodedBf16> appended =
        AppendRandomKeys(client, *id, layer, 600, random);
    ASSERT_TRUE(appended.ok()) << appended.status();
    keys[layer] = *std::move(appended);
  }
  absl::StatusOr<std::unique_ptr<SelectSession>> session = client.StartSelectSession();
  ASSERT_TRUE(session.ok()) << session.status();
  auto request_for = [&](int32_t layer, const testing::EncodedBf16& queries) {
    return OneRowDecode(10 + layer, layer, *id, 600, queries);
  };
  // Layer 2 first: nothing to reuse yet.
  const testing::EncodedBf16 queries =
      testing::RandomBf16(random, model.num_heads * model.head_dim);
  absl::StatusOr<SelectResult> early = (*session)->Call(request_for(2, queries));
  EXPECT_EQ(early.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(early.status().message(),
            "layer 2 reuses the selection of layer 1, which this session has not selected yet; "
            "select layer 1 first");
  // Layers 1, 2, 3 pipelined. Layer 2's batch carries no queries at all: the
  // server would refuse it, so its answer can only come from layer 1's.
  v1::SelectRequest reusing = request_for(2, queries);
  reusing.clear_queries();
  ASSERT_TRUE((*session)->Send(request_for(1, queries)).ok());
  ASSERT_TRUE((*session)->Send(reusing).ok());
  ASSERT_TRUE((*session)->Send(request_for(3, queries)).ok());
  absl::StatusOr<SelectResult> first = (*session)->Receive();
  absl::StatusOr<SelectResult> second = (*session)->Receive();
  absl::StatusOr<SelectResult> third = (*session)->Receive();
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_TRUE(third.ok()) << third.status();
  for (const auto& [layer, result] :
       std::vector<std::pair<int32_t, const SelectResult*>>{{1, &*first}, {3, &*third}}) {
    EXPECT_EQ(result->block_ids,
              ReferenceSelect(model.shape(), {{keys[layer].values.data(), 599, 1}},
                              queries.values.data()))
        << "layer " << layer;
  }
  EXPECT_EQ(second->request_id, 12u);
  EXPECT_EQ(second->block_ids, first->block_ids);
  EXPECT_TRUE((*session)->Close().ok());
}

// As above with layer 2 audited: its answer is still layer 1's, and its
// batch also reaches the server, which compares layer 2's own selection
// with layer 1's. The server's reply to the audit is dropped in between.
TEST(SelectSessionTest, AnAuditedLayerGetsTheSelectionItReusesAndTheServerAuditsIt) {
  const std::string address = SocketAddress("audit");
  std::unique_ptr<BlockselServer> server = StartServer(address, {1, 3}, {2});
  ASSERT_NE(server, nullptr);
  BlockselClient client(address);
  const ModelConfig model = testing::SmallTestModel();
  std::mt19937_64 random(11);
  absl::StatusOr<uint64_t> id = client.OpenSequence();
  ASSERT_TRUE(id.ok()) << id.status();
  std::map<int32_t, testing::EncodedBf16> keys;
  for (const int32_t layer : {1, 2}) {  // an audited layer stores keys
    absl::StatusOr<testing::EncodedBf16> appended =
        AppendRandomKeys(client, *id, layer, 900, random);
    ASSERT_TRUE(appended.ok()) << "layer " << layer << ": " << appended.status();
    keys[layer] = *std::move(appended);
  }
  absl::StatusOr<std::unique_ptr<SelectSession>> session = client.StartSelectSession();
  ASSERT_TRUE(session.ok()) << session.status();
  auto request_for = [&](uint64_t request_id, int32_t layer, const testing::EncodedBf16& queries) {
    return OneRowDecode(request_id, layer, *id, 900, queries);
  };
  const testing::EncodedBf16 first_queries =
      testing::RandomBf16(random, model.num_heads * model.head_dim);
  const testing::EncodedBf16 later_queries =
      testing::RandomBf16(random, model.num_heads * model.head_dim);
  ASSERT_TRUE((*session)->Send(request_for(1, 1, first_queries)).ok());
  ASSERT_TRUE((*session)->Send(request_for(2, 2, later_queries)).ok());
  ASSERT_TRUE((*session)->Send(request_for(3, 1, later_queries)).ok());
  absl::StatusOr<SelectResult> source = (*session)->Receive();
  absl::StatusOr<SelectResult> audited = (*session)->Receive();
  absl::StatusOr<SelectResult> later = (*session)->Receive();
  ASSERT_TRUE(source.ok()) << source.status();
  ASSERT_TRUE(audited.ok()) << audited.status();
  ASSERT_TRUE(later.ok()) << later.status();
  auto reference = [&](const testing::EncodedBf16& queries) {
    return ReferenceSelect(model.shape(), {{keys[1].values.data(), 899, 1}}, queries.values.data());
  };
  EXPECT_EQ(source->block_ids, reference(first_queries));
  EXPECT_EQ(audited->request_id, 2u);
  EXPECT_EQ(audited->block_ids, source->block_ids) << "the audit never changes the answer";
  EXPECT_EQ(later->request_id, 3u) << "the audit's reply was read and dropped";
  EXPECT_EQ(later->block_ids, reference(later_queries));
  // A last audit whose reply only Close reads.
  ASSERT_TRUE((*session)->Call(request_for(4, 2, later_queries)).ok());
  EXPECT_TRUE((*session)->Close().ok());
  const std::string metrics = server->metrics().Text();
  EXPECT_NE(metrics.find(R"(blocksel_reuse_audits_total{layer_distance="1",result="compared"} 2)"),
            std::string::npos)
      << metrics;
}

TEST(AsyncSelectSessionTest, PipelinedBatchesAnswerInOrderThroughCallbacks) {
  const std::string address = SocketAddress("async");
  std::unique_ptr<BlockselServer> server = StartServer(address);
  ASSERT_NE(server, nullptr);
  BlockselClient client(address);
  const ModelConfig model = testing::SmallTestModel();
  std::mt19937_64 random(5);
  absl::StatusOr<uint64_t> id = client.OpenSequence();
  ASSERT_TRUE(id.ok()) << id.status();
  testing::EncodedBf16 keys = testing::RandomBf16(random, 900 * model.head_dim);
  v1::AppendKeysRequest append;
  v1::KeyAppend* key_append = append.add_appends();
  key_append->set_sequence_id(*id);
  key_append->set_first_layer(kLayer);
  key_append->set_num_tokens(900);
  key_append->set_keys(keys.bytes);
  ASSERT_TRUE(client.AppendKeys(append).ok());

  // Twice the in-flight limit, so Send has to wait for answers.
  constexpr int kBatches = 16;
  absl::StatusOr<std::unique_ptr<AsyncSelectSession>> session =
      AsyncSelectSession::Start(client, /*max_inflight=*/8);
  ASSERT_TRUE(session.ok()) << session.status();
  std::vector<std::vector<int32_t>> expected(kBatches);
  std::vector<absl::StatusOr<SelectResult>> answers(kBatches, absl::UnknownError("no answer"));
  std::vector<int> order;
  for (int i = 0; i < kBatches; ++i) {
    const int64_t seq_len = 900 - 37 * i;
    testing::EncodedBf16 queries = testing::RandomBf16(random, model.num_heads * model.head_dim);
    expected[i] = ReferenceSelect(model.shape(), {{keys.values.data(), seq_len - 1, 1}},
                                  queries.values.data());
    v1::SelectRequest request;
    request.set_request_id(100 + i);
    request.set_layer(kLayer);
    v1::DecodeRequest* decode = request.mutable_decode()->add_requests();
    decode->set_sequence_id(*id);
    decode->set_seq_len(seq_len);
    request.set_queries(queries.bytes);
    // Batch 5 names an unknown sequence: its own error, the stream goes on.
    if (i == 5) decode->set_sequence_id(*id + 1);
    ASSERT_TRUE((*session)
                    ->Send(request,
                           [&answers, &order, i](absl::StatusOr<SelectResult> answer) {
                             answers[i] = std::move(answer);
                             order.push_back(i);  // the reader thread only
                           })
                    .ok());
  }
  ASSERT_TRUE((*session)->Close().ok());
  ASSERT_EQ(order.size(), static_cast<size_t>(kBatches));
  for (int i = 0; i < kBatches; ++i) {
    EXPECT_EQ(order[i], i);
    if (i == 5) {
      EXPECT_EQ(answers[i].status().code(), absl::StatusCode::kNotFound);
      continue;
    }
    ASSERT_TRUE(answers[i].ok()) << i << ": " << answers[i].status();
    EXPECT_EQ(answers[i]->request_id, static_cast<uint64_t>(100 + i));
    EXPECT_EQ(answers[i]->block_ids, expected[i]) << "batch " << i;
  }
}

}  // namespace
}  // namespace blocksel
