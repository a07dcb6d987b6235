// Cache snapshots across a real restart of blocksel-server: written when
// draining and on request, loaded at start, refused when damaged or written
// for another model (the server then starts empty).
#include <signal.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include "client/blocksel_client.h"
#include "client/encoding.h"
#include "gtest/gtest.h"
#include "tests/support/server_process.h"
#include "tests/support/snapshot_server_test.h"

namespace blocksel {
namespace {

using testing::ServerProcess;

constexpr auto kServing = grpc::health::v1::HealthCheckResponse::SERVING;
constexpr uint64_t kSequence = 42;
constexpr int64_t kTokens = 700;

class SnapshotTest : public testing::SnapshotServerTest {
 protected:
  std::unique_ptr<ServerProcess> Start(std::vector<std::string> extra = {}) {
    extra.push_back("--drain_propagation_seconds=0");
    return StartServer(std::move(extra));
  }

  // Opens kSequence with keys for every sparse layer (1..3) and returns the
  // block ids of one decode step on layer 2.
  static void Fill(BlockselClient& client) {
    ASSERT_EQ(client.OpenSequence(kSequence, 600).value_or(0), kSequence);
    std::vector<float> values(3 * kTokens * 32);
    for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>((i * 37) % 11) - 5;
    v1::AppendKeysRequest request;
    v1::KeyAppend* append = request.add_appends();
    append->set_sequence_id(kSequence);
    append->set_first_layer(1);
    append->set_num_layers(3);
    append->set_num_tokens(kTokens);
    append->set_keys(EncodeBf16(values));
    ASSERT_TRUE(client.AppendKeys(request).ok());
  }

  static absl::StatusOr<SelectResult> Decode(BlockselClient& client, uint32_t layer = 2) {
    v1::SelectRequest request;
    request.set_layer(layer);
    v1::DecodeRequest* decode = request.mutable_decode()->add_requests();
    decode->set_sequence_id(kSequence);
    decode->set_seq_len(kTokens);
    std::vector<float> queries(2 * 32);
    for (size_t i = 0; i < queries.size(); ++i) queries[i] = static_cast<float>(i % 7) - 3;
    request.set_queries(EncodeBf16(queries));
    return client.Select(request);
  }
};

TEST_F(SnapshotTest, DrainWritesItAndARestartRestoresEverySequence) {
  std::vector<int32_t> before;
  {
    std::unique_ptr<ServerProcess> server = Start();
    BlockselClient client(server->target());
    Fill(client);
    absl::StatusOr<SelectResult> selected = Decode(client);
    ASSERT_TRUE(selected.ok()) << selected.status();
    before = selected->block_ids;
    server->Signal(SIGTERM);
    ASSERT_EQ(server->WaitExit(absl::Seconds(30)), 0) << server->Log();
    EXPECT_NE(server->Log().find("snapshot written: 1 sequences"), std::string::npos)
        << server->Log();
  }
  ASSERT_TRUE(std::filesystem::exists(snapshot_path_));
  std::unique_ptr<ServerProcess> restarted = Start();
  EXPECT_NE(restarted->Log().find("snapshot restored: 1 sequences"), std::string::npos)
      << restarted->Log();
  BlockselClient client(restarted->target());
  absl::StatusOr<v1::GetInfoResponse> info = client.GetInfo();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->cache().open_sequences(), 1u);
  absl::StatusOr<SelectResult> after = Decode(client);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->block_ids, before);
}

TEST_F(SnapshotTest, WrittenOnRequest) {
  std::unique_ptr<ServerProcess> server = Start();
  BlockselClient client(server->target());
  Fill(client);
  absl::StatusOr<v1::WriteSnapshotResponse> written = client.WriteSnapshot();
  ASSERT_TRUE(written.ok()) << written.status();
  EXPECT_EQ(written->sequences(), 1u);
  EXPECT_EQ(written->path(), snapshot_path_);
  EXPECT_EQ(static_cast<uint64_t>(std::filesystem::file_size(snapshot_path_)), written->bytes());
}

TEST_F(SnapshotTest, DamagedSnapshotIsRefusedAndTheServerStartsEmpty) {
  {
    std::unique_ptr<ServerProcess> server = Start();
    BlockselClient client(server->target());
    Fill(client);
    ASSERT_TRUE(client.WriteSnapshot().ok());
  }
  {
    std::fstream file(snapshot_path_, std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(100);
    file.put('\x5a');  // one byte of keys
  }
  std::unique_ptr<ServerProcess> server = Start();
  EXPECT_NE(server->Log().find("snapshot refused"), std::string::npos) << server->Log();
  EXPECT_NE(server->Log().find("checksum"), std::string::npos) << server->Log();
  BlockselClient client(server->target());
  EXPECT_EQ(client.GetInfo()->cache().open_sequences(), 0u);
}

TEST_F(SnapshotTest, SnapshotOfAnotherModelIsRefused) {
  {
    std::unique_ptr<ServerProcess> server = Start();
    BlockselClient client(server->target());
    Fill(client);
    ASSERT_TRUE(client.WriteSnapshot().ok());
  }
  std::unique_ptr<ServerProcess> server = Start({"--head_dim=64"});
  EXPECT_NE(server->Log().find("snapshot refused"), std::string::npos) << server->Log();
  EXPECT_NE(server->Log().find("head_dim=32"), std::string::npos) << server->Log();
  BlockselClient client(server->target());
  EXPECT_EQ(client.GetInfo()->cache().open_sequences(), 0u);
}

TEST_F(SnapshotTest, SnapshotOfAnotherGroupingIsRefused) {
  {
    std::unique_ptr<ServerProcess> server = Start();
    BlockselClient client(server->target());
    Fill(client);
    ASSERT_TRUE(client.WriteSnapshot().ok());
  }
  std::unique_ptr<ServerProcess> server = Start({"--select_every=2"});
  EXPECT_NE(server->Log().find("snapshot refused"), std::string::npos) << server->Log();
  EXPECT_NE(server->Log().find("written for key layers 1,2,3; this server stores keys of 1,3"),
            std::string::npos)
      << server->Log();
  BlockselClient client(server->target());
  EXPECT_EQ(client.GetInfo()->cache().open_sequences(), 0u);
}

TEST_F(SnapshotTest, AGroupedCacheSurvivesARestart) {
  absl::StatusOr<SelectResult> before;
  {
    std::unique_ptr<ServerProcess> server = Start({"--select_every=2"});
    BlockselClient client(server->target());
    ASSERT_EQ(client.OpenSequence(kSequence, 600).value_or(0), kSequence);
    // Keys for the selecting layers 1 and 3, one append each.
    for (const uint32_t layer : {1u, 3u}) {
      std::vector<float> values(kTokens * 32);
      for (size_t i = 0; i < values.size(); ++i) {
        values[i] = static_cast<float>((i * 37 + layer) % 11) - 5;
      }
      v1::AppendKeysRequest request;
      v1::KeyAppend* append = request.add_appends();
      append->set_sequence_id(kSequence);
      append->set_first_layer(layer);
      append->set_num_tokens(kTokens);
      append->set_keys(EncodeBf16(values));
      ASSERT_TRUE(client.AppendKeys(request).ok());
    }
    before = Decode(client, 3);
    ASSERT_TRUE(before.ok()) << before.status();
    ASSERT_TRUE(client.WriteSnapshot().ok());
  }
  std::unique_ptr<ServerProcess> server = Start({"--select_every=2"});
  BlockselClient client(server->target());
  EXPECT_EQ(client.GetInfo()->cache().open_sequences(), 1u) << server->Log();
  absl::StatusOr<SelectResult> after = Decode(client, 3);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(after->block_ids, before->block_ids);
}

TEST_F(SnapshotTest, WithoutAPathTheRequestIsFailedPrecondition) {
  ServerProcess server(BLOCKSEL_SERVER_BINARY, {});
  ASSERT_TRUE(server.AwaitHealth("", kServing, absl::Seconds(30)));
  BlockselClient client(server.target());
  EXPECT_EQ(client.WriteSnapshot().status().code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace blocksel
