// The co-located GPU data plane end to end: a worker (this process) and the
// server binary (a child process) on one GPU. Selections through GPU memory
// must equal the gRPC path's on the same inputs, keys carried in a slot
// must land in the cache, and every failure must end the worker's wait
// with a clear status: a bad batch, a detached or expired attachment, a
// killed server. A worker that dies leaves its region to be reclaimed.
// Skips without a GPU.
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/blocksel_client.h"
#include "client/gpu_batch_buffers.h"
#include "client/gpu_peer_access.h"
#include "client/gpu_select_session.h"
#include "colocated/slot_request.h"
#include "gtest/gtest.h"
#include "kernels/gpu/gpu_selection.h"
#include "tests/support/server_process.h"
#include "tests/support/test_model.h"

extern char** environ;

namespace blocksel {
namespace {

// ServerProcess's model: H=2, D=32, topk 4, layers 1..3 sparse.
constexpr int32_t kHeads = 2;
constexpr int32_t kHeadDim = 32;
constexpr int32_t kTopk = 4;
constexpr uint32_t kLayer = 1;
constexpr char kChildTarget[] = "BLOCKSEL_COLOCATED_CHILD_TARGET";
using testing::ServerProcess;

class GpuSessionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (gpu::DeviceCount() == 0) GTEST_SKIP() << "no GPU on this machine";
    ASSERT_EQ(gpu::StreamCreate(&stream_), KernelStatus::kOk);
  }
  void TearDown() override { gpu::StreamDestroy(stream_); }

  void StartServer(std::vector<std::string> extra = {}) {
    extra.push_back("--backend=cuda");
    server_ = std::make_unique<ServerProcess>(BLOCKSEL_SERVER_BINARY, extra);
    ASSERT_TRUE(
        server_->AwaitHealth("", grpc::health::v1::HealthCheckResponse::SERVING, absl::Seconds(60)))
        << server_->Log();
    client_ = std::make_unique<BlockselClient>(server_->target());
  }

  std::unique_ptr<GpuSelectSession> Attach(GpuSessionOptions options = {}) {
    options.max_requests = 4;
    options.with_keys = true;
    absl::StatusOr<std::unique_ptr<GpuSelectSession>> session =
        GpuSelectSession::Attach(client_.get(), options);
    EXPECT_TRUE(session.ok()) << session.status();
    return session.ok() ? std::move(*session) : nullptr;
  }

  // Opens a sequence holding `tokens` random keys on kLayer.
  uint64_t OpenWithKeys(int64_t tokens) {
    absl::StatusOr<uint64_t> id = client_->OpenSequence();
    EXPECT_TRUE(id.ok()) << id.status();
    v1::AppendKeysRequest append;
    v1::KeyAppend* keys = append.add_appends();
    keys->set_sequence_id(*id);
    keys->set_first_layer(kLayer);
    keys->set_num_tokens(static_cast<uint32_t>(tokens));
    keys->set_keys(testing::RandomBf16(random_, tokens * kHeadDim).bytes);
    EXPECT_TRUE(client_->AppendKeys(append).ok());
    return *id;
  }

  // The same decode batch through gRPC, without keys.
  std::vector<int32_t> SelectOverGrpc(const std::vector<colocated::SlotDecodeRequest>& requests,
                                      const std::string& queries) {
    v1::SelectRequest request;
    request.set_layer(kLayer);
    request.set_queries(queries);
    for (const colocated::SlotDecodeRequest& entry : requests) {
      v1::DecodeRequest* decode = request.mutable_decode()->add_requests();
      decode->set_sequence_id(entry.sequence_id);
      decode->set_seq_len(entry.seq_len);
    }
    absl::StatusOr<SelectResult> result = client_->Select(request);
    EXPECT_TRUE(result.ok()) << result.status();
    return result.ok() ? result->block_ids : std::vector<int32_t>{};
  }

  struct Answer {
    absl::Status status;
    std::vector<int32_t> ids;
  };
  Answer SelectOnGpu(GpuSelectSession& session, GpuBatchBuffers& buffers,
                     const std::vector<colocated::SlotDecodeRequest>& requests,
                     const std::string& queries, const std::string& keys = "",
                     uint32_t layer = kLayer) {
    colocated::SlotBatchHeader header;
    header.layer = layer;
    header.num_requests = static_cast<uint32_t>(requests.size());
    header.tokens_per_request = 1;
    header.flags = keys.empty() ? 0 : colocated::kSlotCarriesKeys;
    Answer answer;
    answer.status = buffers.Stage(header, requests, queries, keys, stream_);
    if (!answer.status.ok()) return answer;
    answer.status = session.Select(buffers.selection(), stream_);
    if (!answer.status.ok()) return answer;
    absl::StatusOr<std::vector<int32_t>> ids = buffers.FetchIds(stream_);
    if (!ids.ok()) {
      answer.status = ids.status();
      return answer;
    }
    answer.ids = std::move(*ids);
    answer.status = session.LastStatus();
    return answer;
  }

  std::unique_ptr<GpuBatchBuffers> Buffers(const GpuSelectSession& session) {
    absl::StatusOr<std::unique_ptr<GpuBatchBuffers>> buffers =
        GpuBatchBuffers::Create(session, kHeads, kTopk);
    EXPECT_TRUE(buffers.ok()) << buffers.status();
    return buffers.ok() ? std::move(*buffers) : nullptr;
  }

  std::string Queries(int rows) {
    return testing::RandomBf16(random_, int64_t{rows} * kHeads * kHeadDim).bytes;
  }

  std::mt19937_64 random_{20261202};
  void* stream_ = nullptr;
  std::unique_ptr<ServerProcess> server_;
  std::unique_ptr<BlockselClient> client_;
};

TEST_F(GpuSessionTest, SelectionsEqualTheGrpcPathAndKeysLandInTheCache) {
  StartServer();
  std::unique_ptr<GpuSelectSession> session = Attach();
  ASSERT_NE(session, nullptr);
  std::unique_ptr<GpuBatchBuffers> buffers = Buffers(*session);
  ASSERT_NE(buffers, nullptr);
  // Three sequences with 1, 9 and 20 blocks, one padding request.
  const uint64_t a = OpenWithKeys(100);
  const uint64_t b = OpenWithKeys(1100);
  const uint64_t c = OpenWithKeys(2560);
  std::vector<colocated::SlotDecodeRequest> requests = {{a, 100}, {0, 0}, {b, 1100}, {c, 2560}};
  for (int step = 0; step < 20; ++step) {
    const std::string queries = Queries(4);
    const Answer gpu = SelectOnGpu(*session, *buffers, requests, queries);
    ASSERT_TRUE(gpu.status.ok()) << gpu.status;
    EXPECT_EQ(gpu.ids, SelectOverGrpc(requests, queries)) << "step " << step;
  }
  // One new token per sequence, its keys carried by the slot; gRPC then
  // selects over the cache the slot appended to.
  requests = {{a, 101}, {0, 0}, {b, 1101}, {c, 2561}};
  const std::string queries = Queries(4);
  const std::string keys = testing::RandomBf16(random_, 3 * kHeadDim).bytes;
  const Answer appended = SelectOnGpu(*session, *buffers, requests, queries, keys);
  ASSERT_TRUE(appended.status.ok()) << appended.status;
  EXPECT_EQ(appended.ids, SelectOverGrpc(requests, queries));
}

TEST_F(GpuSessionTest, ABadBatchGetsItsStatusAndNoBlocksAndOthersGoOn) {
  StartServer();
  std::unique_ptr<GpuSelectSession> session = Attach();
  ASSERT_NE(session, nullptr);
  std::unique_ptr<GpuBatchBuffers> buffers = Buffers(*session);
  const uint64_t a = OpenWithKeys(300);
  Answer answer = SelectOnGpu(*session, *buffers, {{a + 1000, 300}}, Queries(1));
  EXPECT_EQ(answer.status.code(), absl::StatusCode::kNotFound) << answer.status;
  EXPECT_EQ(answer.ids, std::vector<int32_t>(kHeads * kTopk, -1));
  answer = SelectOnGpu(*session, *buffers, {{a, 300}}, Queries(1), "", /*layer=*/0);
  EXPECT_EQ(answer.status.code(), absl::StatusCode::kInvalidArgument) << answer.status;
  // Keys past the cache's end are refused and append nothing.
  answer = SelectOnGpu(*session, *buffers, {{a, 310}}, Queries(1),
                       testing::RandomBf16(random_, kHeadDim).bytes);
  EXPECT_FALSE(answer.status.ok());
  const std::string queries = Queries(1);
  answer = SelectOnGpu(*session, *buffers, {{a, 300}}, queries);
  ASSERT_TRUE(answer.status.ok()) << answer.status;
  EXPECT_EQ(answer.ids, SelectOverGrpc({{a, 300}}, queries));
}

TEST_F(GpuSessionTest, ADetachedAttachmentEndsTheWaitWithUnavailable) {
  StartServer();
  std::unique_ptr<GpuSelectSession> session = Attach();
  ASSERT_NE(session, nullptr);
  std::unique_ptr<GpuBatchBuffers> buffers = Buffers(*session);
  const uint64_t a = OpenWithKeys(200);
  ASSERT_TRUE(client_->Detach(session->attachment_id()).ok());
  const absl::Time start = absl::Now();
  const Answer answer = SelectOnGpu(*session, *buffers, {{a, 200}}, Queries(1));
  EXPECT_EQ(answer.status.code(), absl::StatusCode::kUnavailable) << answer.status;
  EXPECT_EQ(answer.ids, std::vector<int32_t>(kHeads * kTopk, -1));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

TEST_F(GpuSessionTest, AKilledServerEndsTheWaitInsteadOfHanging) {
  StartServer();
  GpuSessionOptions options;
  options.wait_timeout = absl::Seconds(3);
  std::unique_ptr<GpuSelectSession> session = Attach(options);
  ASSERT_NE(session, nullptr);
  std::unique_ptr<GpuBatchBuffers> buffers = Buffers(*session);
  const uint64_t a = OpenWithKeys(200);
  server_->Signal(SIGKILL);
  server_->WaitExit(absl::Seconds(10));
  const absl::Time start = absl::Now();
  const Answer answer = SelectOnGpu(*session, *buffers, {{a, 200}}, Queries(1));
  // Either the session noticed the lost attachment first (UNAVAILABLE) or
  // the wait ran out (DEADLINE_EXCEEDED); never a hang, never blocks.
  EXPECT_TRUE(answer.status.code() == absl::StatusCode::kUnavailable ||
              answer.status.code() == absl::StatusCode::kDeadlineExceeded)
      << answer.status;
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
}

// The check a session makes when the server's GPU is another: on one GPU,
// the same GPU passes (whatever the case of its bus id) and an unseen one
// is refused with the fix; with more GPUs, each passes exactly when the
// runtime reports peer access to it.
TEST(GpuPeerAccess, TheSameGpuPassesAndAnUnseenOneIsRefusedWithTheFix) {
  if (gpu::DeviceCount() == 0) GTEST_SKIP() << "no GPU on this machine";
  std::string own;
  ASSERT_EQ(gpu::PciBusId(0, &own), KernelStatus::kOk);
  EXPECT_TRUE(CheckPeerAccess(0, own).ok());
  EXPECT_TRUE(CheckPeerAccess(0, absl::AsciiStrToUpper(own)).ok());
  const absl::Status unseen = CheckPeerAccess(0, "0000:ff:1f.0");
  EXPECT_EQ(unseen.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(unseen.message(),
            absl::StrCat("the server's GPU 0000:ff:1f.0 is not visible in this process (its GPU 0 "
                         "is ",
                         own,
                         "): make both visible (CUDA_VISIBLE_DEVICES) so that the server's memory "
                         "can be reached over peer access, or use the gRPC data plane"));
  for (int device = 1; device < gpu::DeviceCount(); ++device) {
    std::string bus_id;
    bool reaches = false;
    ASSERT_EQ(gpu::PciBusId(device, &bus_id), KernelStatus::kOk);
    ASSERT_EQ(gpu::CanAccessPeer(0, device, &reaches), KernelStatus::kOk);
    EXPECT_EQ(CheckPeerAccess(0, bus_id).ok(), reaches) << bus_id;
  }
}

// Run as a child process by the next test: attaches, then exits without
// detaching, as a worker that crashes mid-step.
TEST(GpuSessionChild, AttachesAndDies) {
  const char* target = std::getenv(kChildTarget);
  if (target == nullptr) GTEST_SKIP() << "runs as the child of ADeadWorkersRegionIsReclaimed";
  BlockselClient client(target);
  GpuSessionOptions options;
  options.lease_seconds = 2;
  absl::StatusOr<std::unique_ptr<GpuSelectSession>> session =
      GpuSelectSession::Attach(&client, options);
  if (!session.ok()) _exit(2);
  _exit(0);
}

TEST_F(GpuSessionTest, ADeadWorkersRegionIsReclaimed) {
  StartServer({"--colocated_max_attachments=1"});
  const std::string variable = std::string(kChildTarget) + "=" + server_->target();
  std::vector<char*> environment = {const_cast<char*>(variable.c_str())};
  for (char** entry = environ; *entry != nullptr; ++entry) environment.push_back(*entry);
  environment.push_back(nullptr);
  std::string self = "/proc/self/exe";
  std::string filter = "--gtest_filter=GpuSessionChild.AttachesAndDies";
  char* argv[] = {self.data(), filter.data(), nullptr};
  pid_t child = -1;
  ASSERT_EQ(posix_spawn(&child, argv[0], nullptr, nullptr, argv, environment.data()), 0);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the child did not attach";
  // Its attachment holds the only place until its 2 s lease runs out.
  absl::StatusOr<std::unique_ptr<GpuSelectSession>> refused =
      GpuSelectSession::Attach(client_.get(), GpuSessionOptions{});
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  absl::SleepFor(absl::Seconds(3));
  std::unique_ptr<GpuSelectSession> session = Attach();
  ASSERT_NE(session, nullptr);
  std::unique_ptr<GpuBatchBuffers> buffers = Buffers(*session);
  const uint64_t a = OpenWithKeys(200);
  const std::string queries = Queries(1);
  const Answer answer = SelectOnGpu(*session, *buffers, {{a, 200}}, queries);
  ASSERT_TRUE(answer.status.ok()) << answer.status;
  EXPECT_EQ(answer.ids, SelectOverGrpc({{a, 200}}, queries));
}

}  // namespace
}  // namespace blocksel
