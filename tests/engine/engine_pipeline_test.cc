// The engine with selections in flight: a backend that, like a GPU, holds
// several started selections and finishes them only when the test lets
// their "device work" complete.
#include <algorithm>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "client/encoding.h"
#include "client/reference_selection.h"
#include "gtest/gtest.h"
#include "server/engine/cpu_backend.h"
#include "server/engine/engine.h"
#include "tests/support/test_model.h"

namespace blocksel {
namespace {

constexpr int64_t kPages = 32;
constexpr int32_t kLayer = testing::kTestFirstSparseLayer;

// Computes each selection when it starts (the inputs it reads are the
// state of that moment, as a device reads them in stream order) but hands
// the ids to the engine only in FinishOldest, and reports the oldest ready
// only once the test has completed it. Poisons the batch's ids at Start,
// so an engine that read them early would see the poison.
class DeferredBackend final : public Backend {
 public:
  explicit DeferredBackend(std::unique_ptr<CpuBackend> cpu, int max_pending)
      : cpu_(std::move(cpu)), max_pending_(max_pending) {}

  absl::string_view name() const override { return "deferred"; }
  std::string detail() const override { return "cpu, finished on demand"; }
  absl::Status WriteKeys(absl::Span<const KeyWrite> writes) override {
    return cpu_->WriteKeys(writes);
  }
  absl::Status ReadKeys(absl::Span<const KeyRead> reads) override { return cpu_->ReadKeys(reads); }

  absl::Status Start(int32_t layer_index, const SelectionBatch& batch,
                     absl::Span<const KeyWrite> writes, const DevicePayload* device) override {
    EXPECT_LT(pending(), max_pending_) << "the engine started past max_pending";
    const size_t ids = static_cast<size_t>(batch.total_rows) * shape_.num_heads * shape_.topk;
    Started started;
    started.destination = batch.block_ids;
    started.ids.resize(ids);
    SelectionBatch local = batch;
    local.block_ids = started.ids.data();
    absl::Status status = cpu_->Start(layer_index, local, writes, device);
    if (!status.ok()) return status;
    absl::StatusOr<SelectionReport> report = cpu_->FinishOldest();
    if (!report.ok()) return report.status();
    std::fill(batch.block_ids, batch.block_ids + ids, -7);
    started_.push_back(std::move(started));
    return absl::OkStatus();
  }
  int pending() const override { return static_cast<int>(started_.size()); }
  int max_pending() const override { return max_pending_; }
  bool OldestReady() override { return !started_.empty() && completed_ > 0; }
  absl::StatusOr<SelectionReport> FinishOldest() override {
    EXPECT_FALSE(started_.empty());
    if (completed_ > 0) --completed_;
    std::copy(started_.front().ids.begin(), started_.front().ids.end(),
              started_.front().destination);
    started_.pop_front();
    ++finished_;
    return SelectionReport{};
  }

  // The device finishes the oldest `count` selections not yet completed.
  void Complete(int count) { completed_ += count; }
  int finished() const { return finished_; }
  void set_shape(const SelectionShape& shape) { shape_ = shape; }

 private:
  struct Started {
    int32_t* destination = nullptr;
    std::vector<int32_t> ids;
  };
  std::unique_ptr<CpuBackend> cpu_;
  const int max_pending_;
  SelectionShape shape_;
  std::deque<Started> started_;
  int completed_ = 0;
  int finished_ = 0;
};

class EnginePipelineTest : public ::testing::Test {
 protected:
  static constexpr int kMaxPending = 2;

  void SetUp() override {
    model_ = testing::SmallTestModel();
    absl::StatusOr<std::unique_ptr<CpuBackend>> cpu = CpuBackend::Create(model_, kPages, 1);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    auto backend = std::make_unique<DeferredBackend>(std::move(*cpu), kMaxPending);
    backend->set_shape(model_.shape());
    backend_ = backend.get();
    EngineOptions options;
    options.model = model_;
    options.num_pages = kPages;
    options.max_sequences = 8;
    engine_ = std::make_unique<Engine>(std::move(options), std::move(backend));
  }

  uint64_t OpenWithKeys(int64_t tokens) {
    v1::OpenSequenceRequest open;
    absl::StatusOr<v1::OpenSequenceResponse> opened = engine_->OpenSequence(open);
    EXPECT_TRUE(opened.ok()) << opened.status();
    const uint64_t id = opened->sequence_id();
    testing::EncodedBf16 keys = testing::RandomBf16(random_, tokens * model_.head_dim);
    v1::AppendKeysRequest append;
    v1::KeyAppend* range = append.add_appends();
    range->set_sequence_id(id);
    range->set_first_layer(kLayer);
    range->set_num_tokens(static_cast<uint32_t>(tokens));
    range->set_keys(keys.bytes);
    EXPECT_TRUE(engine_->AppendKeys(append).ok());
    keys_[id] = keys.values;
    return id;
  }

  // A decode of one row at seq_len, with its expected ids.
  struct Decode {
    v1::SelectRequest request;
    v1::Selection selection;
    std::vector<int32_t> expected;
    SelectCall call;
  };
  std::unique_ptr<Decode> MakeDecode(uint64_t id, int64_t seq_len) {
    auto decode = std::make_unique<Decode>();
    decode->request.set_layer(kLayer);
    v1::DecodeRequest* row = decode->request.mutable_decode()->add_requests();
    row->set_sequence_id(id);
    row->set_seq_len(static_cast<uint64_t>(seq_len));
    testing::EncodedBf16 queries =
        testing::RandomBf16(random_, int64_t{model_.num_heads} * model_.head_dim);
    decode->request.set_queries(queries.bytes);
    decode->expected = ReferenceSelect(model_.shape(), {{keys_[id].data(), seq_len - 1, 1}},
                                       queries.values.data());
    decode->call = {&decode->request, &decode->selection, absl::OkStatus()};
    return decode;
  }

  std::vector<int32_t> Ids(const v1::Selection& selection) {
    absl::StatusOr<std::vector<int32_t>> ids = DecodeBlockIds(selection);
    EXPECT_TRUE(ids.ok()) << ids.status();
    return ids.ok() ? *ids : std::vector<int32_t>{};
  }

  ModelConfig model_;
  DeferredBackend* backend_ = nullptr;
  std::unique_ptr<Engine> engine_;
  std::mt19937_64 random_{4242};
  std::map<uint64_t, std::vector<float>> keys_;
};

// Answers wait for their device work, then come in the order of the
// SelectMany calls: a call that failed validation (no launch at all) is
// answered after the launches before it.
TEST_F(EnginePipelineTest, AnswersWaitForTheDeviceAndKeepTheirOrder) {
  const uint64_t a = OpenWithKeys(600);
  const uint64_t b = OpenWithKeys(900);
  std::unique_ptr<Decode> first = MakeDecode(a, 600);
  std::unique_ptr<Decode> invalid = MakeDecode(b, 900);
  invalid->request.set_layer(0);  // dense
  std::unique_ptr<Decode> second = MakeDecode(b, 900);
  std::vector<int> answered;
  engine_->SelectMany(absl::MakeSpan(&first->call, 1), [&] { answered.push_back(1); });
  engine_->SelectMany(absl::MakeSpan(&invalid->call, 1), [&] { answered.push_back(2); });
  engine_->SelectMany(absl::MakeSpan(&second->call, 1), [&] { answered.push_back(3); });
  EXPECT_TRUE(engine_->FinishSelections(/*wait=*/false));
  EXPECT_TRUE(answered.empty());  // nothing completed on the device yet
  backend_->Complete(1);
  EXPECT_TRUE(engine_->FinishSelections(/*wait=*/false));
  EXPECT_EQ(answered, (std::vector<int>{1, 2}));
  backend_->Complete(1);
  EXPECT_FALSE(engine_->FinishSelections(/*wait=*/false));
  EXPECT_EQ(answered, (std::vector<int>{1, 2, 3}));
  EXPECT_TRUE(first->call.status.ok()) << first->call.status;
  EXPECT_EQ(invalid->call.status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(second->call.status.ok()) << second->call.status;
  EXPECT_EQ(Ids(first->selection), first->expected);
  EXPECT_EQ(Ids(second->selection), second->expected);
}

// Past max_pending, starting another launch finishes the oldest first;
// cache changes made while launches are pending (a release, and appends
// that reuse its pages) do not change what those launches answer.
TEST_F(EnginePipelineTest, TheOldestFinishesToMakeRoomAndLaterChangesDoNotLeakBack) {
  const uint64_t a = OpenWithKeys(700);
  const uint64_t b = OpenWithKeys(300);
  const uint64_t c = OpenWithKeys(500);
  std::vector<std::unique_ptr<Decode>> decodes;
  decodes.push_back(MakeDecode(a, 700));
  decodes.push_back(MakeDecode(b, 300));
  int answered = 0;
  for (auto& decode : decodes) {
    engine_->SelectMany(absl::MakeSpan(&decode->call, 1), [&] { ++answered; });
  }
  EXPECT_EQ(backend_->pending(), kMaxPending);
  v1::ReleaseSequenceRequest release;
  release.set_sequence_id(a);
  EXPECT_TRUE(engine_->ReleaseSequence(release).released());
  const uint64_t d = OpenWithKeys(1000);  // takes a's pages
  decodes.push_back(MakeDecode(c, 500));
  engine_->SelectMany(absl::MakeSpan(&decodes.back()->call, 1), [&] { ++answered; });
  EXPECT_EQ(backend_->finished(), 1);  // a's launch made room
  EXPECT_EQ(answered, 1);
  decodes.push_back(MakeDecode(d, 1000));
  engine_->SelectMany(absl::MakeSpan(&decodes.back()->call, 1), [&] { ++answered; });
  EXPECT_FALSE(engine_->FinishSelections(/*wait=*/true));
  EXPECT_EQ(answered, 4);
  for (auto& decode : decodes) {
    ASSERT_TRUE(decode->call.status.ok()) << decode->call.status;
    EXPECT_EQ(Ids(decode->selection), decode->expected);
  }
}

// The synchronous Select waits for its own answer.
TEST_F(EnginePipelineTest, SelectWaitsForItsAnswer) {
  const uint64_t a = OpenWithKeys(400);
  std::unique_ptr<Decode> decode = MakeDecode(a, 400);
  backend_->Complete(1);
  ASSERT_TRUE(engine_->Select(decode->request, &decode->selection).ok());
  EXPECT_EQ(Ids(decode->selection), decode->expected);
  EXPECT_FALSE(engine_->FinishSelections(/*wait=*/false));
}

}  // namespace
}  // namespace blocksel
