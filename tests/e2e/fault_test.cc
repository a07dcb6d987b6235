// Faults with a real child-process server under load: SIGKILL (clients see
// UNAVAILABLE promptly, a restart from the last snapshot restores the
// sequences), SIGTERM drain (no request goes unanswered), a full cache
// (other sequences are still served) and consumers that never read (the
// server's resident memory stays bounded).
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "blocksel/v1/block_selector.grpc.pb.h"
#include "client/blocksel_client.h"
#include "client/encoding.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "tests/support/server_process.h"
#include "tests/support/snapshot_server_test.h"

namespace blocksel {
namespace {

using testing::ServerProcess;

constexpr int32_t kLayer = 1;
constexpr int64_t kTokens = 600;

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;
#elif defined(__has_feature)
constexpr bool kSanitized = __has_feature(address_sanitizer) || __has_feature(thread_sanitizer);
#else
constexpr bool kSanitized = false;
#endif

class FaultTest : public testing::SnapshotServerTest {
 protected:
  // Opens sequence id with tokens keys (small integers) in layer kLayer.
  static void Fill(BlockselClient& client, uint64_t id, int64_t tokens = kTokens) {
    ASSERT_EQ(client.OpenSequence(id, 600).value_or(0), id);
    std::vector<float> values(tokens * 32);
    for (size_t i = 0; i < values.size(); ++i) {
      values[i] = static_cast<float>((i * 37 + id) % 11) - 5;
    }
    v1::AppendKeysRequest request;
    v1::KeyAppend* append = request.add_appends();
    append->set_sequence_id(id);
    append->set_first_layer(kLayer);
    append->set_num_tokens(tokens);
    append->set_keys(EncodeBf16(values));
    ASSERT_TRUE(client.AppendKeys(request).ok());
  }

  static v1::SelectRequest DecodeOf(uint64_t id, uint64_t request_id = 0) {
    v1::SelectRequest request;
    request.set_request_id(request_id);
    request.set_layer(kLayer);
    v1::DecodeRequest* decode = request.mutable_decode()->add_requests();
    decode->set_sequence_id(id);
    decode->set_seq_len(kTokens);
    std::vector<float> queries(2 * 32);
    for (size_t i = 0; i < queries.size(); ++i) queries[i] = static_cast<float>(i % 7) - 3;
    request.set_queries(EncodeBf16(queries));
    return request;
  }

  static ClientOptions NoRetries() {
    ClientOptions options;
    options.max_attempts = 1;
    options.timeout = absl::Seconds(5);
    return options;
  }
};

TEST_F(FaultTest, KilledServerIsUnavailablePromptlyAndRestartsFromItsSnapshot) {
  constexpr int kSequences = 4;
  std::vector<std::vector<int32_t>> before(kSequences);
  std::unique_ptr<ServerProcess> server = StartServer();
  BlockselClient client(server->target(), NoRetries());
  for (int s = 0; s < kSequences; ++s) Fill(client, 100 + s);
  for (int s = 0; s < kSequences; ++s) {
    absl::StatusOr<SelectResult> result = client.Select(DecodeOf(100 + s));
    ASSERT_TRUE(result.ok()) << result.status();
    before[s] = result->block_ids;
  }
  ASSERT_TRUE(client.WriteSnapshot().ok());

  // Load from two threads, then SIGKILL: every client must see an error
  // (UNAVAILABLE) within a second, not hang.
  std::atomic<bool> killed{false};
  std::atomic<int64_t> served{0};
  std::vector<absl::Duration> noticed(2, absl::InfiniteDuration());
  std::vector<absl::StatusCode> codes(2, absl::StatusCode::kOk);
  absl::Time kill_time;
  std::vector<std::thread> load;
  for (int t = 0; t < 2; ++t) {
    load.emplace_back([&, t] {
      BlockselClient own(server->target(), NoRetries());
      for (;;) {
        absl::StatusOr<SelectResult> result = own.Select(DecodeOf(100 + t));
        if (result.ok()) {
          ++served;
          continue;
        }
        if (killed.load()) {
          noticed[t] = absl::Now() - kill_time;
          codes[t] = result.status().code();
          return;
        }
      }
    });
  }
  absl::SleepFor(absl::Milliseconds(300));
  kill_time = absl::Now();
  killed = true;
  server->Signal(SIGKILL);
  for (std::thread& thread : load) thread.join();
  EXPECT_GT(served.load(), 0);
  for (int t = 0; t < 2; ++t) {
    EXPECT_EQ(codes[t], absl::StatusCode::kUnavailable) << "client " << t;
    EXPECT_LT(noticed[t], absl::Seconds(1)) << "client " << t;
  }
  std::cout << "SIGKILL after " << served.load() << " answered selections; the clients saw "
            << absl::StatusCodeToString(codes[0]) << " after " << noticed[0] << " and "
            << noticed[1] << "\n";

  // The restart loads the snapshot written before the kill.
  server.reset();
  server = StartServer();
  BlockselClient after(server->target(), NoRetries());
  absl::StatusOr<v1::GetInfoResponse> info = after.GetInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->cache().open_sequences(), static_cast<uint64_t>(kSequences));
  for (int s = 0; s < kSequences; ++s) {
    absl::StatusOr<SelectResult> result = after.Select(DecodeOf(100 + s));
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->block_ids, before[s]) << "sequence " << 100 + s;
  }
}

TEST_F(FaultTest, DrainUnderLoadAnswersEveryRequest) {
  std::unique_ptr<ServerProcess> server =
      StartServer({"--drain_propagation_seconds=1", "--shutdown_grace_seconds=1"});
  BlockselClient client(server->target(), NoRetries());
  Fill(client, 7);
  // Streams pipeline requests through the whole drain: the propagation
  // wait (served as usual), then the grace, then the cancellation of the
  // streams still open. Each request sent must come back as an answer or
  // an error status, never silence.
  constexpr int kStreams = 4;
  std::vector<int64_t> sent(kStreams, 0), answered(kStreams, 0), failed(kStreams, 0);
  std::vector<std::thread> streams;
  for (int s = 0; s < kStreams; ++s) {
    streams.emplace_back([&, s] {
      BlockselClient own(server->target(), NoRetries());
      absl::StatusOr<std::unique_ptr<SelectSession>> session = own.StartSelectSession();
      if (!session.ok()) return;
      for (uint64_t i = 0;; ++i) {
        if (!(*session)->Send(DecodeOf(7, i)).ok()) break;
        ++sent[s];
        absl::StatusOr<SelectResult> result = (*session)->Receive();
        ++answered[s];  // an answer, or the status the stream ended with
        if (!result.ok()) {
          ++failed[s];
          break;
        }
      }
    });
  }
  absl::SleepFor(absl::Milliseconds(300));
  server->Signal(SIGTERM);
  for (std::thread& thread : streams) thread.join();
  EXPECT_EQ(server->WaitExit(absl::Seconds(60)), 0) << server->Log();
  int64_t total = 0;
  for (int s = 0; s < kStreams; ++s) {
    EXPECT_EQ(answered[s], sent[s]) << "stream " << s;
    EXPECT_LE(failed[s], 1) << "stream " << s;
    total += sent[s];
  }
  EXPECT_GT(total, 0);
  int64_t failures = 0;
  for (int64_t f : failed) failures += f;
  std::cout << "drain under load: " << total << " requests sent on " << kStreams
            << " streams, every one answered (" << total - failures << " selections, " << failures
            << " final stream statuses)\n";
}

TEST_F(FaultTest, FullCacheUnderLoadLeavesOtherSequencesServed) {
  // 1 MiB of cache holds 42 pages of this model (3 sparse layers x 128
  // tokens x D=32 x 2 bytes = 24 KiB a page).
  std::unique_ptr<ServerProcess> server = StartServer({"--cache_mib=1"});
  BlockselClient client(server->target(), NoRetries());
  Fill(client, 1);
  absl::StatusOr<SelectResult> expected = client.Select(DecodeOf(1));
  ASSERT_TRUE(expected.ok()) << expected.status();

  std::atomic<bool> stop{false};
  std::atomic<int64_t> served{0}, wrong{0};
  std::thread reader([&] {
    BlockselClient own(server->target(), NoRetries());
    while (!stop.load()) {
      absl::StatusOr<SelectResult> result = own.Select(DecodeOf(1));
      if (result.ok() && result->block_ids == expected->block_ids) {
        ++served;
      } else {
        ++wrong;
      }
    }
  });
  // Another sequence grows until the cache is full.
  ASSERT_EQ(client.OpenSequence(2, 600).value_or(0), 2u);
  absl::Status full;
  std::vector<float> chunk(128 * 32, 1.0f);
  for (int64_t start = 0; full.ok() && start < 100 * 128; start += 128) {
    v1::AppendKeysRequest request;
    v1::KeyAppend* append = request.add_appends();
    append->set_sequence_id(2);
    append->set_first_layer(kLayer);
    append->set_start_position(start);
    append->set_num_tokens(128);
    append->set_keys(EncodeBf16(chunk));
    full = client.AppendKeys(request).status();
  }
  absl::SleepFor(absl::Milliseconds(200));
  stop = true;
  reader.join();
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  EXPECT_GT(served.load(), 0);
  EXPECT_EQ(wrong.load(), 0);
  std::cout << "full cache: " << served.load()
            << " selections of another sequence served while one grew into "
               "RESOURCE_EXHAUSTED, none wrong\n";
  // Releasing the grown sequence frees its pages for others.
  EXPECT_TRUE(client.ReleaseSequence(2).value_or(false));
  ASSERT_EQ(client.OpenSequence(3, 600).value_or(0), 3u);
  Fill(client, 4);
}

TEST_F(FaultTest, ConsumersThatNeverReadLeaveServerMemoryBounded) {
  // Each request is a 2048-token prefill (256 KiB of queries) whose answer
  // carries block scores (2048 x 2 heads x (4 ids + 16 scores) x 4 bytes =
  // 320 KiB). 32 streams of 100 requests would be 1800 MiB of requests and
  // answers if the server buffered them all. What it may hold: gRPC's
  // buffers (the ResourceQuota) plus, per stream, the requests read ahead
  // and their answers.
  constexpr int64_t kRows = 2048;
  constexpr int kStreams = 32;
  constexpr int kRequestsPerStream = 100;
  constexpr int64_t kGrpcMemory = int64_t{256} << 20;
  constexpr int kReadAhead = 4;
  constexpr int64_t kRequestBytes = kRows * 2 * 32 * 2;
  constexpr int64_t kAnswerBytes = kRows * 2 * (4 + 16) * 4;
  // Protobuf and allocator overhead on top.
  constexpr int64_t kSlack = int64_t{64} << 20;
  constexpr int64_t kBound =
      kGrpcMemory + kStreams * kReadAhead * (kRequestBytes + kAnswerBytes) + kSlack;
  std::unique_ptr<ServerProcess> server =
      StartServer({"--grpc_memory_mib=" + std::to_string(kGrpcMemory >> 20),
                   "--max_message_mib=" + std::to_string(kGrpcMemory >> 22),
                   "--stream_max_inflight=" + std::to_string(kReadAhead)});
  BlockselClient client(server->target(), NoRetries());
  Fill(client, 9, kRows);
  v1::SelectRequest request;
  request.set_layer(kLayer);
  request.set_return_block_scores(true);
  v1::PrefillRequest* rows = request.mutable_prefill()->add_requests();
  rows->set_sequence_id(9);
  rows->set_prefix_len(0);
  rows->set_q_len(kRows);
  std::vector<float> queries(kRows * 2 * 32);
  for (size_t i = 0; i < queries.size(); ++i) queries[i] = static_cast<float>(i % 13) - 6;
  request.set_queries(EncodeBf16(queries));
  // Served once the usual way: the answer to compare against afterwards,
  // and the server's memory once it has done this work.
  absl::StatusOr<SelectResult> expected = client.Select(request);
  ASSERT_TRUE(expected.ok()) << expected.status();
  const int64_t baseline = server->ResidentBytes();
  ASSERT_GT(baseline, 0);

  // Opens the streams, which send without reading, and samples the
  // server's memory until neither it nor the requests sent have grown for
  // two seconds; then cancels them. Returns how many requests the streams
  // got out, and the peak.
  auto stall = [&](int64_t* peak) {
    auto channel = grpc::CreateChannel(server->target(), grpc::InsecureChannelCredentials());
    std::unique_ptr<v1::BlockSelector::Stub> stub = v1::BlockSelector::NewStub(channel);
    std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
    std::vector<std::thread> senders;
    std::atomic<int64_t> sent{0};
    for (int s = 0; s < kStreams; ++s) {
      contexts.push_back(std::make_unique<grpc::ClientContext>());
      senders.emplace_back([&, context = contexts.back().get()] {
        auto stream = stub->StreamSelect(context);
        for (int i = 0; i < kRequestsPerStream; ++i) {
          if (!stream->Write(request)) break;  // cancelled below
          ++sent;
        }
        grpc::Status ignored = stream->Finish();  // cancelled: nothing to check
      });
    }
    *peak = 0;
    int64_t sent_before = -1;
    const absl::Time give_up = absl::Now() + absl::Seconds(30);
    for (absl::Time last_growth = absl::Now();
         absl::Now() - last_growth < absl::Seconds(2) && absl::Now() < give_up;) {
      absl::SleepFor(absl::Milliseconds(100));
      const int64_t now = server->ResidentBytes();
      if (now > *peak + (1 << 20) || sent.load() != sent_before) last_growth = absl::Now();
      *peak = std::max(*peak, now);
      sent_before = sent.load();
    }
    const int64_t stalled = sent.load();
    for (auto& context : contexts) context->TryCancel();
    for (std::thread& sender : senders) sender.join();
    return stalled;
  };
  // Twice: had the first round's streams leaked what they held, the second
  // round would go past the bound.
  std::vector<int64_t> peaks(2), sent(2);
  for (int round = 0; round < 2; ++round) {
    sent[round] = stall(&peaks[round]);
    absl::StatusOr<SelectResult> after = client.Select(request);
    ASSERT_TRUE(after.ok()) << after.status();
    EXPECT_EQ(after->block_ids, expected->block_ids);
    std::cout << "consumers that never read, round " << round + 1 << ": " << kStreams
              << " streams got " << sent[round] << " of " << kStreams * kRequestsPerStream
              << " requests out; server RSS " << (baseline >> 20) << " MiB before, peak "
              << (peaks[round] >> 20) << " MiB (+" << ((peaks[round] - baseline) >> 20)
              << " MiB, bound +" << (kBound >> 20) << " MiB), " << (server->ResidentBytes() >> 20)
              << " MiB after the cancels\n";
    EXPECT_LT(sent[round], kStreams * kRequestsPerStream);
    // Under a sanitizer the RSS is mostly its shadow memory (and ASan's
    // quarantine of freed blocks), not the server's buffers.
    if (!kSanitized) {
      EXPECT_LT(peaks[round] - baseline, kBound);
    }
  }
}

}  // namespace
}  // namespace blocksel
