#include "server/engine/engine.h"

#include <algorithm>
#include <cstdint>
#include <iterator>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "blocksel/v1/block_selector.pb.h"
#include "client/encoding.h"
#include "client/reference_selection.h"
#include "gtest/gtest.h"
#include "server/engine/cpu_backend.h"
#include "server/engine/model_config.h"
#include "tests/support/test_model.h"

namespace blocksel {
namespace {

constexpr int64_t kPages = 32;
constexpr int32_t kFirstSparseLayer = testing::kTestFirstSparseLayer;
constexpr int32_t kLastLayer = 3;

using Encoded = testing::EncodedBf16;

class EngineTest : public ::testing::Test {
 protected:
  // The model the engine is made for.
  virtual ModelConfig Model() const { return testing::SmallTestModel(); }
  // What the engine tells; may be null.
  virtual EngineObserver* Observer() { return nullptr; }

  void SetUp() override {
    model_ = Model();
    absl::StatusOr<std::unique_ptr<CpuBackend>> backend =
        CpuBackend::Create(model_, kPages, /*num_threads=*/1);
    ASSERT_TRUE(backend.ok()) << backend.status();
    EngineOptions options;
    options.model = model_;
    options.num_pages = kPages;
    options.max_sequences = 16;
    options.default_lease = absl::Minutes(10);
    options.max_lease = absl::Hours(1);
    options.clock = [this] { return now_; };
    options.observer = Observer();
    engine_ = std::make_unique<Engine>(std::move(options), std::move(*backend));
  }

  Encoded RandomBf16(int64_t count) { return testing::RandomBf16(random_, count); }
  Encoded RandomKeys(int64_t tokens) { return RandomBf16(tokens * model_.head_dim); }
  Encoded RandomQueries(int64_t rows) {
    return RandomBf16(rows * model_.num_heads * model_.head_dim);
  }

  // SelectMany, then every launch finished; whether its callback ran.
  bool SelectManyAndWait(absl::Span<SelectCall> calls) {
    bool done = false;
    engine_->SelectMany(calls, [&done] { done = true; });
    while (engine_->FinishSelections(/*wait=*/true)) {
    }
    return done;
  }

  uint64_t Open(uint64_t id = 0, uint32_t lease_seconds = 0) {
    v1::OpenSequenceRequest request;
    request.set_sequence_id(id);
    request.set_lease_seconds(lease_seconds);
    absl::StatusOr<v1::OpenSequenceResponse> opened = engine_->OpenSequence(request);
    EXPECT_TRUE(opened.ok()) << opened.status();
    return opened.ok() ? opened->sequence_id() : 0;
  }

  // What the test expects the cache to hold: the key values of each
  // (sequence, model layer), as the server decoded them.
  void Remember(uint64_t sequence, int32_t layer, int64_t start, const std::vector<float>& values) {
    std::vector<float>& keys = keys_[{sequence, layer}];
    // An append sets the fill to its end, so a rewrite drops what followed.
    keys.resize(start * model_.head_dim + values.size());
    std::copy(values.begin(), values.end(), keys.begin() + start * model_.head_dim);
  }

  // Appends random keys through AppendKeys and remembers them.
  absl::Status AppendRandom(uint64_t sequence, int32_t layer, int64_t start, int64_t tokens) {
    Encoded keys = RandomKeys(tokens);
    v1::AppendKeysRequest request;
    v1::KeyAppend* append = request.add_appends();
    append->set_sequence_id(sequence);
    append->set_first_layer(layer);
    append->set_start_position(start);
    append->set_num_tokens(static_cast<uint32_t>(tokens));
    append->set_keys(keys.bytes);
    absl::StatusOr<v1::AppendKeysResponse> appended = engine_->AppendKeys(request);
    if (!appended.ok()) return appended.status();
    EXPECT_EQ(appended->tokens_appended(), static_cast<uint64_t>(tokens));
    Remember(sequence, layer, start, keys.values);
    return absl::OkStatus();
  }

  const float* KeysOf(uint64_t sequence, int32_t layer) { return keys_[{sequence, layer}].data(); }

  std::vector<int32_t> Reference(const std::vector<ReferenceRows>& rows,
                                 const std::vector<float>& queries) const {
    return ReferenceSelect(model_.shape(), rows, queries.data());
  }

  static std::vector<int32_t> Ids(const v1::Selection& selection) {
    absl::StatusOr<std::vector<int32_t>> ids = DecodeBlockIds(selection);
    EXPECT_TRUE(ids.ok()) << ids.status();
    return ids.ok() ? *ids : std::vector<int32_t>{};
  }

  int64_t FreePages() const { return engine_->cache_stats().free_pages; }

  ModelConfig model_;
  std::unique_ptr<Engine> engine_;
  absl::Time now_ = absl::FromUnixSeconds(1'700'000'000);
  std::mt19937_64 random_{20240611};
  std::map<std::pair<uint64_t, int32_t>, std::vector<float>> keys_;
};

TEST_F(EngineTest, FillInfoDescribesModelCacheAndBackend) {
  const uint64_t id = Open();
  ASSERT_TRUE(AppendRandom(id, kFirstSparseLayer, 0, 130).ok());
  v1::GetInfoResponse info;
  engine_->FillInfo(&info);
  EXPECT_EQ(info.model().num_layers(), 4u);
  EXPECT_EQ(info.model().first_sparse_layer(), 1u);
  EXPECT_EQ(info.model().num_heads(), 2u);
  EXPECT_EQ(info.model().head_dim(), 32u);
  EXPECT_EQ(info.model().key_dtype(), v1::KEY_DTYPE_BF16);
  EXPECT_EQ(info.model().topk(), 4u);
  EXPECT_EQ(info.model().init_blocks(), 1u);
  EXPECT_EQ(info.model().local_blocks(), 1u);
  EXPECT_EQ(info.model().block_size(), 128u);
  EXPECT_EQ(info.model().max_positions(), 4096u);
  EXPECT_EQ(info.cache().total_pages(), static_cast<uint64_t>(kPages));
  EXPECT_EQ(info.cache().free_pages(), static_cast<uint64_t>(kPages - 2));
  // 128 tokens x 32 bf16 elements x 3 sparse layers.
  EXPECT_EQ(info.cache().page_bytes(), 128u * 32u * 2u * 3u);
  EXPECT_EQ(info.cache().open_sequences(), 1u);
  EXPECT_EQ(info.backend(), "cpu");
  EXPECT_FALSE(info.backend_detail().empty());
  EXPECT_EQ(info.default_lease_seconds(), 600u);
}

// Sparse layers 1 and 3 select; layer 2 reuses layer 1's selection.
class GroupedEngineTest : public EngineTest {
 protected:
  ModelConfig Model() const override {
    ModelConfig model = testing::SmallTestModel();
    model.selecting_layers = {1, 3};
    return model;
  }
};

TEST_F(GroupedEngineTest, InfoListsTheSelectingLayersAndPagesHoldOnlyTheirKeys) {
  v1::GetInfoResponse info;
  engine_->FillInfo(&info);
  EXPECT_EQ(std::vector<uint32_t>(info.model().selecting_layers().begin(),
                                  info.model().selecting_layers().end()),
            (std::vector<uint32_t>{1, 3}));
  // 128 tokens x 32 bf16 elements x 2 selecting layers.
  EXPECT_EQ(info.cache().page_bytes(), 128u * 32u * 2u * 2u);
  EXPECT_EQ(info.model().audited_layers_size(), 0) << "the audit is off by default";
}

TEST_F(GroupedEngineTest, AnAuditBatchWithoutAuditedLayersIsRejected) {
  const uint64_t id = Open();
  ASSERT_TRUE(AppendRandom(id, 1, 0, 200).ok());
  v1::SelectRequest request;
  request.set_layer(2);
  request.set_audit(true);
  v1::DecodeRequest* decode = request.mutable_decode()->add_requests();
  decode->set_sequence_id(id);
  decode->set_seq_len(200);
  request.set_queries(RandomQueries(1).bytes);
  v1::Selection selection;
  const absl::Status status = engine_->Select(request, &selection);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(),
            "layer 2 is not audited (audited layers: none); send audit batches only for "
            "GetInfo's audited_layers");
}

TEST_F(GroupedEngineTest, AppendsToAReusingLayerAreRejectedWhole) {
  const uint64_t id = Open();
  for (const uint32_t num_layers : {1u, 2u}) {
    v1::AppendKeysRequest request;
    v1::KeyAppend* good = request.add_appends();
    good->set_sequence_id(id);
    good->set_first_layer(3);
    good->set_num_tokens(1);
    good->set_keys(RandomKeys(1).bytes);
    // Layer 2 alone, then layers [1, 3): both hold the reusing layer 2.
    v1::KeyAppend* reusing = request.add_appends();
    reusing->set_sequence_id(id);
    reusing->set_first_layer(num_layers == 1 ? 2 : 1);
    reusing->set_num_layers(num_layers);
    reusing->set_num_tokens(1);
    reusing->set_keys(RandomBf16(num_layers * model_.head_dim).bytes);
    const absl::StatusOr<v1::AppendKeysResponse> appended = engine_->AppendKeys(request);
    ASSERT_FALSE(appended.ok());
    EXPECT_EQ(appended.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(appended.status().message(),
              "append 1: layer 2 reuses the selection of layer 1 and stores no index keys; "
              "append keys for the selecting and audited layers only (1,3)");
    EXPECT_EQ(FreePages(), kPages);  // the good append did not land either
  }
}

TEST_F(GroupedEngineTest, SelectingLayersSelectAndReusingOnesAreRejected) {
  const uint64_t id = Open();
  ASSERT_TRUE(AppendRandom(id, 1, 0, 700).ok());
  ASSERT_TRUE(AppendRandom(id, 3, 0, 700).ok());
  Encoded queries = RandomQueries(1);
  v1::SelectRequest request;
  request.mutable_decode()->set_tokens_per_request(1);
  v1::DecodeRequest* decode = request.mutable_decode()->add_requests();
  decode->set_sequence_id(id);
  decode->set_seq_len(700);
  request.set_queries(queries.bytes);
  for (const int32_t layer : {1, 3}) {
    request.set_layer(layer);
    v1::Selection selection;
    const absl::Status status = engine_->Select(request, &selection);
    ASSERT_TRUE(status.ok()) << status;
    EXPECT_EQ(Ids(selection), Reference({{KeysOf(id, layer), 699, 1}}, queries.values))
        << "layer " << layer;
  }
  request.set_layer(2);
  v1::Selection selection;
  const absl::Status status = engine_->Select(request, &selection);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(),
            "layer 2 reuses the selection of layer 1 and is not selected on the server; select "
            "layer 1 and use its block ids");
}

// What the engine told of its reuse audits.
class AuditRecorder : public EngineObserver {
 public:
  void OnReuseAudit(int32_t layer_distance, absl::Span<const double> overlaps) override {
    compared.push_back({layer_distance, std::vector<double>(overlaps.begin(), overlaps.end())});
  }
  void OnReuseAuditSkipped(int32_t layer_distance) override { skipped.push_back(layer_distance); }

  std::vector<std::pair<int32_t, std::vector<double>>> compared;
  std::vector<int32_t> skipped;
};

// |audited ∩ source| / |source| over one row's valid ids, with sets: the
// audit's rule, computed apart from the engine's code.
double ExpectedOverlap(const int32_t* audited, const int32_t* source, int32_t topk) {
  std::set<int32_t> audited_ids(audited, audited + topk);
  std::set<int32_t> source_ids(source, source + topk);
  audited_ids.erase(-1);
  source_ids.erase(-1);
  std::vector<int32_t> shared;
  std::set_intersection(audited_ids.begin(), audited_ids.end(), source_ids.begin(),
                        source_ids.end(), std::back_inserter(shared));
  return static_cast<double>(shared.size()) / static_cast<double>(source_ids.size());
}

// Sparse layers 1 and 3 select; layer 2 reuses layer 1's selection and is
// audited on one in AuditEvery() of its audit batches.
class AuditedEngineTest : public GroupedEngineTest {
 protected:
  virtual int32_t AuditEvery() const { return 1; }
  ModelConfig Model() const override {
    ModelConfig model = GroupedEngineTest::Model();
    model.audited_layers = {2};
    model.audit_every = AuditEvery();
    return model;
  }
  EngineObserver* Observer() override { return &recorder_; }

  // A decode batch of `layer`: Q rows for each sequence up to seq_len, then
  // a padding request of Q rows.
  static v1::SelectRequest DecodeBatch(int32_t layer, const std::vector<uint64_t>& ids,
                                       int64_t seq_len, int32_t q, const Encoded& queries,
                                       bool audit) {
    v1::SelectRequest request;
    request.set_layer(layer);
    request.set_audit(audit);
    request.mutable_decode()->set_tokens_per_request(q);
    for (const uint64_t id : ids) {
      v1::DecodeRequest* decode = request.mutable_decode()->add_requests();
      decode->set_sequence_id(id);
      decode->set_seq_len(seq_len);
    }
    request.mutable_decode()->add_requests()->set_seq_len(0);
    request.set_queries(queries.bytes);
    return request;
  }

  // Selects, expecting OK.
  v1::Selection SelectOk(const v1::SelectRequest& request) {
    v1::Selection selection;
    const absl::Status status = engine_->Select(request, &selection);
    EXPECT_TRUE(status.ok()) << status;
    return selection;
  }

  AuditRecorder recorder_;
};

TEST_F(AuditedEngineTest, InfoListsTheAuditedLayersAndPagesHoldTheirKeysToo) {
  v1::GetInfoResponse info;
  engine_->FillInfo(&info);
  EXPECT_EQ(std::vector<uint32_t>(info.model().audited_layers().begin(),
                                  info.model().audited_layers().end()),
            (std::vector<uint32_t>{2}));
  // 128 tokens x 32 bf16 elements x 3 layers: selecting 1 and 3, audited 2.
  EXPECT_EQ(info.cache().page_bytes(), 128u * 32u * 2u * 3u);
  const uint64_t id = Open();
  EXPECT_TRUE(AppendRandom(id, 2, 0, 10).ok()) << "an audited layer stores keys";
}

TEST_F(AuditedEngineTest, OnlyDecodeAuditBatchesOfAuditedLayersAreAccepted) {
  const uint64_t id = Open();
  ASSERT_TRUE(AppendRandom(id, 2, 0, 300).ok());
  ASSERT_TRUE(AppendRandom(id, 3, 0, 300).ok());
  const Encoded queries = RandomQueries(2);
  v1::Selection selection;
  absl::Status status =
      engine_->Select(DecodeBatch(2, {id}, 300, 1, queries, /*audit=*/false), &selection);
  EXPECT_EQ(status.message(),
            "layer 2 reuses the selection of layer 1 and is not selected on the server; select "
            "layer 1 and use its block ids");
  status = engine_->Select(DecodeBatch(3, {id}, 300, 1, queries, /*audit=*/true), &selection);
  EXPECT_EQ(status.message(),
            "layer 3 is not audited (audited layers: 2); send audit batches only for GetInfo's "
            "audited_layers");
  v1::SelectRequest prefill;
  prefill.set_layer(2);
  prefill.set_audit(true);
  v1::PrefillRequest* chunk = prefill.mutable_prefill()->add_requests();
  chunk->set_sequence_id(id);
  chunk->set_q_len(2);
  prefill.set_queries(queries.bytes);
  status = engine_->Select(prefill, &selection);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(status.message(),
            "an audit batch (layer 2) must be a decode batch without return_block_scores; got "
            "no decode batch");
  EXPECT_TRUE(recorder_.compared.empty());
  EXPECT_TRUE(recorder_.skipped.empty());
}

// Random keys and queries for layers 1 and 2, two sequences of Q = 2 rows
// and a padding request: the overlap of every (head, row) is the one the
// float64 reference's selections of both layers give.
TEST_F(AuditedEngineTest, OverlapMatchesAnIndependentComputationOnRandomInputs) {
  constexpr int64_t kTokens = 1500;  // 12 blocks, of which topk 4 are selected
  constexpr int32_t kQ = 2;
  const std::vector<uint64_t> ids = {Open(), Open()};
  for (const uint64_t id : ids) {
    for (const int32_t layer : {1, 2}) ASSERT_TRUE(AppendRandom(id, layer, 0, kTokens).ok());
  }
  const int32_t rows = static_cast<int32_t>(ids.size() + 1) * kQ;
  const Encoded source_queries = RandomQueries(rows);
  const Encoded audited_queries = RandomQueries(rows);
  SelectOk(DecodeBatch(1, ids, kTokens, kQ, source_queries, /*audit=*/false));
  const v1::Selection answer =
      SelectOk(DecodeBatch(2, ids, kTokens, kQ, audited_queries, /*audit=*/true));
  EXPECT_EQ(answer.total_q(), 0u) << "an audit's answer carries no blocks";
  EXPECT_TRUE(answer.block_ids().empty());

  ASSERT_EQ(recorder_.compared.size(), ids.size()) << "one audit per sequence, none of padding";
  EXPECT_TRUE(recorder_.skipped.empty());
  const int64_t row_values = int64_t{model_.num_heads} * model_.head_dim;
  bool some_below_one = false;
  for (size_t s = 0; s < ids.size(); ++s) {
    auto reference = [&](int32_t layer, const Encoded& queries) {
      return Reference({{KeysOf(ids[s], layer), kTokens - kQ, kQ}},
                       std::vector<float>(queries.values.begin() + s * kQ * row_values,
                                          queries.values.begin() + (s + 1) * kQ * row_values));
    };
    const std::vector<int32_t> source = reference(1, source_queries);
    const std::vector<int32_t> audited = reference(2, audited_queries);
    std::vector<double> expected;
    for (int32_t row = 0; row < model_.num_heads * kQ; ++row) {  // [H, Q] rows, head-major
      expected.push_back(ExpectedOverlap(audited.data() + row * model_.topk,
                                         source.data() + row * model_.topk, model_.topk));
      some_below_one = some_below_one || expected.back() < 1.0;
    }
    EXPECT_EQ(recorder_.compared[s].first, 1) << "layer 2 reuses layer 1";
    EXPECT_EQ(recorder_.compared[s].second, expected) << "sequence " << s;
  }
  EXPECT_TRUE(some_below_one) << "random layers should disagree somewhere; the test shows nothing";
}

TEST_F(AuditedEngineTest, OverlapIsOneWhereTheLayersKeysAndQueriesAreEqual) {
  constexpr int64_t kTokens = 1500;
  const uint64_t id = Open();
  const Encoded keys = RandomKeys(kTokens);
  v1::AppendKeysRequest append;
  v1::KeyAppend* both = append.add_appends();
  both->set_sequence_id(id);
  both->set_first_layer(1);
  both->set_num_layers(2);
  both->set_num_tokens(kTokens);
  both->set_keys(keys.bytes + keys.bytes);
  ASSERT_TRUE(engine_->AppendKeys(append).ok());
  const Encoded queries = RandomQueries(2 * 3);
  SelectOk(DecodeBatch(1, {id}, kTokens, 3, queries, /*audit=*/false));
  SelectOk(DecodeBatch(2, {id}, kTokens, 3, queries, /*audit=*/true));
  ASSERT_EQ(recorder_.compared.size(), 1u);
  EXPECT_EQ(recorder_.compared[0].second,
            std::vector<double>(static_cast<size_t>(model_.num_heads) * 3, 1.0));
}

TEST_F(AuditedEngineTest, ReleasingASequenceForgetsItsSourceSelection) {
  const uint64_t id = Open(77);
  ASSERT_TRUE(AppendRandom(id, 1, 0, 300).ok());
  const Encoded queries = RandomQueries(2);
  SelectOk(DecodeBatch(1, {id}, 300, 1, queries, /*audit=*/false));
  v1::ReleaseSequenceRequest release;
  release.set_sequence_id(id);
  ASSERT_TRUE(engine_->ReleaseSequence(release).released());
  ASSERT_EQ(Open(77), id);
  ASSERT_TRUE(AppendRandom(id, 2, 0, 300).ok());
  SelectOk(DecodeBatch(2, {id}, 300, 1, queries, /*audit=*/true));
  EXPECT_TRUE(recorder_.compared.empty());
  EXPECT_EQ(recorder_.skipped, std::vector<int32_t>{1});
}

class AuditEveryThirdEngineTest : public AuditedEngineTest {
 protected:
  int32_t AuditEvery() const override { return 3; }
};

// Each decode step appends its token's keys in the batches. Only the audit
// batches of steps 0 and 3 are compared; the others store their keys, or
// step 3's batch, which starts past a fill that lacks them, would fail.
TEST_F(AuditEveryThirdEngineTest, OneInNAuditBatchesIsComparedAndTheOthersStoreTheirKeys) {
  constexpr int64_t kPrompt = 600;
  const uint64_t id = Open();
  for (const int32_t layer : {1, 2}) ASSERT_TRUE(AppendRandom(id, layer, 0, kPrompt).ok());
  for (int64_t step = 0; step < 6; ++step) {
    const Encoded queries = RandomQueries(2);
    for (const int32_t layer : {1, 2}) {
      v1::SelectRequest request =
          DecodeBatch(layer, {id}, kPrompt + step + 1, 1, queries, /*audit=*/layer == 2);
      request.mutable_decode()->mutable_requests(0)->set_keys(RandomKeys(1).bytes);
      const v1::Selection answer = SelectOk(request);
      EXPECT_EQ(answer.total_q(), layer == 2 ? 0u : 2u) << "step " << step << " layer " << layer;
    }
  }
  EXPECT_EQ(recorder_.compared.size(), 2u);
  EXPECT_TRUE(recorder_.skipped.empty());
  // The 7th audit batch is compared, but it repeats step 4 (a rewind) and
  // layer 1's latest selection is step 5's: skipped, and no error for the
  // client.
  SelectOk(DecodeBatch(2, {id}, kPrompt + 5, 1, RandomQueries(2), /*audit=*/true));
  EXPECT_EQ(recorder_.compared.size(), 2u);
  EXPECT_EQ(recorder_.skipped, std::vector<int32_t>{1});
}

TEST_F(EngineTest, OpenSequenceHonoursIdsAndLeases) {
  v1::OpenSequenceRequest request;
  absl::StatusOr<v1::OpenSequenceResponse> chosen = engine_->OpenSequence(request);
  ASSERT_TRUE(chosen.ok()) << chosen.status();
  EXPECT_NE(chosen->sequence_id(), 0u);
  EXPECT_EQ(chosen->lease_seconds(), 600u) << "0 takes the default lease";

  request.set_sequence_id(1234);
  request.set_lease_seconds(30);
  absl::StatusOr<v1::OpenSequenceResponse> explicit_id = engine_->OpenSequence(request);
  ASSERT_TRUE(explicit_id.ok()) << explicit_id.status();
  EXPECT_EQ(explicit_id->sequence_id(), 1234u);
  EXPECT_EQ(explicit_id->lease_seconds(), 30u);

  EXPECT_EQ(engine_->OpenSequence(request).status().code(), absl::StatusCode::kAlreadyExists);

  request.set_sequence_id(99);
  request.set_lease_seconds(3601);  // past max_lease
  EXPECT_EQ(engine_->OpenSequence(request).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(engine_->cache_stats().open_sequences, 2);
}

TEST_F(EngineTest, ReleaseSequenceReportsWhetherItWasOpen) {
  const uint64_t id = Open();
  ASSERT_TRUE(AppendRandom(id, kFirstSparseLayer, 0, 300).ok());
  EXPECT_EQ(FreePages(), kPages - 3);
  v1::ReleaseSequenceRequest request;
  request.set_sequence_id(id);
  EXPECT_TRUE(engine_->ReleaseSequence(request).released());
  EXPECT_EQ(FreePages(), kPages);
  EXPECT_FALSE(engine_->ReleaseSequence(request).released());
}

TEST_F(EngineTest, AppendKeysCountsTokensTimesLayers) {
  const uint64_t id = Open();
  const int64_t tokens = 10;
  Encoded keys = RandomKeys(3 * tokens);
  v1::AppendKeysRequest request;
  v1::KeyAppend* append = request.add_appends();
  append->set_sequence_id(id);
  append->set_first_layer(1);
  append->set_num_layers(3);
  append->set_num_tokens(tokens);
  append->set_key_dtype(v1::KEY_DTYPE_BF16);
  append->set_keys(keys.bytes);
  absl::StatusOr<v1::AppendKeysResponse> appended = engine_->AppendKeys(request);
  ASSERT_TRUE(appended.ok()) << appended.status();
  EXPECT_EQ(appended->tokens_appended(), 30u);
  EXPECT_EQ(FreePages(), kPages - 1);
}

TEST_F(EngineTest, AppendKeysReadsZeroLayersAsOne) {
  const uint64_t id = Open();
  Encoded keys = RandomKeys(5);
  v1::AppendKeysRequest request;
  v1::KeyAppend* append = request.add_appends();
  append->set_sequence_id(id);
  append->set_first_layer(3);
  append->set_num_layers(0);
  append->set_num_tokens(5);
  append->set_keys(keys.bytes);
  absl::StatusOr<v1::AppendKeysResponse> appended = engine_->AppendKeys(request);
  ASSERT_TRUE(appended.ok()) << appended.status();
  EXPECT_EQ(appended->tokens_appended(), 5u);
}

TEST_F(EngineTest, AppendKeysRejectsBadAppendsAndAppliesNothing) {
  const uint64_t id = Open();
  Encoded keys = RandomKeys(4);
  auto make = [&](uint32_t first_layer, uint32_t num_layers) {
    v1::KeyAppend append;
    append.set_sequence_id(id);
    append.set_first_layer(first_layer);
    append.set_num_layers(num_layers);
    append.set_num_tokens(4);
    append.set_keys(keys.bytes);
    return append;
  };
  struct Case {
    const char* name;
    v1::KeyAppend append;
    absl::StatusCode code;
  };
  std::vector<Case> cases;
  cases.push_back({"dense layer", make(0, 1), absl::StatusCode::kInvalidArgument});
  cases.push_back({"past the last layer", make(4, 1), absl::StatusCode::kInvalidArgument});
  cases.push_back(
      {"range ends past the last layer", make(3, 2), absl::StatusCode::kInvalidArgument});
  Case fp8{"fp8 keys on a bf16 server", make(1, 1), absl::StatusCode::kInvalidArgument};
  fp8.append.set_key_dtype(v1::KEY_DTYPE_FP8_E4M3);
  cases.push_back(fp8);
  Case unknown_dtype{"a key dtype the API does not define", make(1, 1),
                     absl::StatusCode::kInvalidArgument};
  unknown_dtype.append.set_key_dtype(static_cast<v1::KeyDtype>(9));
  cases.push_back(unknown_dtype);
  Case far{"start past max_positions", make(1, 1), absl::StatusCode::kInvalidArgument};
  far.append.set_start_position(5000);
  cases.push_back(far);
  Case short_keys{"keys too short", make(1, 1), absl::StatusCode::kInvalidArgument};
  short_keys.append.mutable_keys()->pop_back();
  cases.push_back(short_keys);
  Case unknown{"unknown sequence", make(1, 1), absl::StatusCode::kNotFound};
  unknown.append.set_sequence_id(id + 1000);
  cases.push_back(unknown);
  Case gap{"gap", make(1, 1), absl::StatusCode::kFailedPrecondition};
  gap.append.set_start_position(1);
  cases.push_back(gap);

  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    // A good append before the bad one must not be applied either.
    v1::AppendKeysRequest request;
    *request.add_appends() = make(2, 1);
    *request.add_appends() = c.append;
    EXPECT_EQ(engine_->AppendKeys(request).status().code(), c.code);
    EXPECT_EQ(FreePages(), kPages);
  }
  // Layer 2 is still empty: appending at 1 is a gap, at 0 is fine.
  v1::AppendKeysRequest gap_probe;
  *gap_probe.add_appends() = make(2, 1);
  gap_probe.mutable_appends(0)->set_start_position(1);
  EXPECT_EQ(engine_->AppendKeys(gap_probe).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(EngineTest, RenewLeaseOfAnUnknownIdIsNotFound) {
  const uint64_t id = Open();
  v1::RenewLeaseRequest request;
  request.add_sequence_ids(id);
  EXPECT_TRUE(engine_->RenewLease(request).ok());
  request.add_sequence_ids(id + 1000);
  EXPECT_EQ(engine_->RenewLease(request).code(), absl::StatusCode::kNotFound);
}

TEST_F(EngineTest, LeasesFollowTheClockAndUseExtendsThem) {
  const uint64_t idle = Open(0, 10);
  const uint64_t selected = Open(0, 10);
  const uint64_t renewed = Open(0, 10);
  const uint64_t appended = Open(0, 10);
  ASSERT_TRUE(AppendRandom(selected, kFirstSparseLayer, 0, 200).ok());
  const absl::Time start = now_;

  now_ = start + absl::Seconds(8);
  v1::SelectRequest select;
  select.set_layer(kFirstSparseLayer);
  v1::DecodeRequest* decode = select.mutable_decode()->add_requests();
  decode->set_sequence_id(selected);
  decode->set_seq_len(200);
  select.set_queries(RandomQueries(1).bytes);
  v1::Selection selection;
  ASSERT_TRUE(engine_->Select(select, &selection).ok());
  v1::RenewLeaseRequest renew;
  renew.add_sequence_ids(renewed);
  ASSERT_TRUE(engine_->RenewLease(renew).ok());
  ASSERT_TRUE(AppendRandom(appended, kFirstSparseLayer, 0, 5).ok());

  now_ = start + absl::Seconds(15);
  EXPECT_EQ(engine_->ReleaseExpired(), 1);
  v1::ReleaseSequenceRequest release;
  release.set_sequence_id(idle);
  EXPECT_FALSE(engine_->ReleaseSequence(release).released()) << "idle expired";
  EXPECT_EQ(engine_->cache_stats().open_sequences, 3);

  now_ = start + absl::Seconds(19);
  EXPECT_EQ(engine_->ReleaseExpired(), 3);
  EXPECT_EQ(engine_->cache_stats().open_sequences, 0);
  EXPECT_EQ(FreePages(), kPages);
  // An expired sequence is gone for every operation.
  v1::Selection after;
  EXPECT_EQ(engine_->Select(select, &after).code(), absl::StatusCode::kNotFound);
}

// A prefill chunk that carries its own keys, appended at prefix_len before
// the selection, next to a fresh sequence whose first chunk carries all its
// keys: one message, two sequences, many more blocks than topk.
TEST_F(EngineTest, PrefillWithKeysInTheRequestMatchesTheReference) {
  const int32_t layer = 2;
  const uint64_t warm = Open();
  const uint64_t fresh = Open();
  ASSERT_TRUE(AppendRandom(warm, layer, 0, 800).ok());

  Encoded warm_chunk = RandomKeys(200);
  Encoded fresh_chunk = RandomKeys(700);
  Encoded queries = RandomQueries(200 + 700);
  v1::SelectRequest request;
  request.set_request_id(7);
  request.set_layer(layer);
  request.set_key_dtype(v1::KEY_DTYPE_BF16);
  request.set_query_dtype(v1::QUERY_DTYPE_BF16);
  v1::PrefillRequest* warm_request = request.mutable_prefill()->add_requests();
  warm_request->set_sequence_id(warm);
  warm_request->set_prefix_len(800);
  warm_request->set_q_len(200);
  warm_request->set_keys(warm_chunk.bytes);
  v1::PrefillRequest* fresh_request = request.mutable_prefill()->add_requests();
  fresh_request->set_sequence_id(fresh);
  fresh_request->set_prefix_len(0);
  fresh_request->set_q_len(700);
  fresh_request->set_keys(fresh_chunk.bytes);
  request.set_queries(queries.bytes);

  v1::Selection selection;
  absl::Status status = engine_->Select(request, &selection);
  ASSERT_TRUE(status.ok()) << status;
  Remember(warm, layer, 800, warm_chunk.values);
  Remember(fresh, layer, 0, fresh_chunk.values);

  EXPECT_EQ(selection.num_heads(), 2u);
  EXPECT_EQ(selection.total_q(), 900u);
  EXPECT_EQ(selection.topk(), 4u);
  EXPECT_EQ(selection.layout(), v1::BLOCK_ID_LAYOUT_HEAD_MAJOR);
  const std::vector<int32_t> expected =
      Reference({{KeysOf(warm, layer), 800, 200}, {KeysOf(fresh, layer), 0, 700}}, queries.values);
  EXPECT_EQ(Ids(selection), expected);
  // 8 pages for warm's 1000 tokens, 6 for fresh's 700.
  EXPECT_EQ(FreePages(), kPages - 8 - 6);

  // The keys stayed: a decode on both sequences now needs none.
  Encoded decode_queries = RandomQueries(2);
  v1::SelectRequest decode;
  decode.set_layer(layer);
  v1::DecodeRequest* first = decode.mutable_decode()->add_requests();
  first->set_sequence_id(warm);
  first->set_seq_len(1000);
  v1::DecodeRequest* second = decode.mutable_decode()->add_requests();
  second->set_sequence_id(fresh);
  second->set_seq_len(700);
  decode.set_queries(decode_queries.bytes);
  v1::Selection decoded;
  ASSERT_TRUE(engine_->Select(decode, &decoded).ok());
  EXPECT_EQ(Ids(decoded), Reference({{KeysOf(warm, layer), 999, 1}, {KeysOf(fresh, layer), 699, 1}},
                                    decode_queries.values));
}

// Speculative decode (Q = 2) on the last sparse layer: new keys in the
// request, a request whose keys are already cached, and a padding request.
TEST_F(EngineTest, DecodeWithKeysAndPaddingMatchesTheReference) {
  const int32_t layer = kLastLayer;
  const uint64_t carries_keys = Open();
  const uint64_t cached = Open();
  ASSERT_TRUE(AppendRandom(carries_keys, layer, 0, 1100).ok());
  ASSERT_TRUE(AppendRandom(cached, layer, 0, 900).ok());

  constexpr int32_t kQ = 2;
  Encoded new_keys = RandomKeys(kQ);
  Encoded queries = RandomQueries(3 * kQ);
  v1::SelectRequest request;
  request.set_layer(layer);
  request.mutable_decode()->set_tokens_per_request(kQ);
  v1::DecodeRequest* with_keys = request.mutable_decode()->add_requests();
  with_keys->set_sequence_id(carries_keys);
  with_keys->set_seq_len(1100 + kQ);
  with_keys->set_keys(new_keys.bytes);
  v1::DecodeRequest* padding = request.mutable_decode()->add_requests();
  padding->set_seq_len(0);
  v1::DecodeRequest* without_keys = request.mutable_decode()->add_requests();
  without_keys->set_sequence_id(cached);
  without_keys->set_seq_len(900);
  request.set_queries(queries.bytes);

  v1::Selection selection;
  absl::Status status = engine_->Select(request, &selection);
  ASSERT_TRUE(status.ok()) << status;
  Remember(carries_keys, layer, 1100, new_keys.values);
  EXPECT_EQ(selection.total_q(), static_cast<uint32_t>(3 * kQ));
  const std::vector<int32_t> ids = Ids(selection);
  EXPECT_EQ(ids, Reference({{KeysOf(carries_keys, layer), 1100, kQ},
                            {nullptr, -kQ, kQ},
                            {KeysOf(cached, layer), 900 - kQ, kQ}},
                           queries.values));
  // The padding rows (2 and 3) are all -1 in both heads.
  for (int32_t head = 0; head < 2; ++head) {
    for (int32_t row = kQ; row < 2 * kQ; ++row) {
      for (int32_t slot = 0; slot < 4; ++slot) {
        EXPECT_EQ(ids[(head * 3 * kQ + row) * 4 + slot], -1);
      }
    }
  }
  // Row 0 sits at position 1100, which sees blocks 0..8: the init block
  // (priority 1e30) comes first, then the local block (1e29).
  EXPECT_EQ(ids[0], 0);
  EXPECT_EQ(ids[1], 8);
}

TEST_F(EngineTest, TokenMajorIsTheTransposedHeadMajorResult) {
  const int32_t layer = kFirstSparseLayer;
  const uint64_t a = Open();
  const uint64_t b = Open();
  ASSERT_TRUE(AppendRandom(a, layer, 0, 1000).ok());
  ASSERT_TRUE(AppendRandom(b, layer, 0, 600).ok());
  Encoded queries = RandomQueries(30);
  v1::SelectRequest request;
  request.set_layer(layer);
  v1::PrefillRequest* first = request.mutable_prefill()->add_requests();
  first->set_sequence_id(a);
  first->set_prefix_len(980);
  first->set_q_len(20);
  v1::PrefillRequest* second = request.mutable_prefill()->add_requests();
  second->set_sequence_id(b);
  second->set_prefix_len(590);
  second->set_q_len(10);
  request.set_queries(queries.bytes);

  v1::Selection head_major;
  ASSERT_TRUE(engine_->Select(request, &head_major).ok());
  request.set_layout(v1::BLOCK_ID_LAYOUT_TOKEN_MAJOR);
  v1::Selection token_major;
  ASSERT_TRUE(engine_->Select(request, &token_major).ok());
  EXPECT_EQ(token_major.layout(), v1::BLOCK_ID_LAYOUT_TOKEN_MAJOR);
  EXPECT_EQ(token_major.total_q(), 30u);

  const std::vector<int32_t> by_head = Ids(head_major);
  const std::vector<int32_t> by_token = Ids(token_major);
  ASSERT_EQ(by_head.size(), 2u * 30u * 4u);
  ASSERT_EQ(by_token.size(), by_head.size());
  for (int head = 0; head < 2; ++head) {
    for (int row = 0; row < 30; ++row) {
      for (int slot = 0; slot < 4; ++slot) {
        EXPECT_EQ(by_token[(row * 2 + head) * 4 + slot], by_head[(head * 30 + row) * 4 + slot])
            << "head " << head << " row " << row << " slot " << slot;
      }
    }
  }
  EXPECT_EQ(by_head,
            Reference({{KeysOf(a, layer), 980, 20}, {KeysOf(b, layer), 590, 10}}, queries.values));
}

// A decode batch of one request (Q = 1) at seq_len, carrying the new
// token's key when new_key is given.
v1::SelectRequest OneDecode(int32_t layer, uint64_t sequence, int64_t seq_len,
                            const std::string& queries, const std::string* new_key) {
  v1::SelectRequest request;
  request.set_layer(layer);
  v1::DecodeRequest* decode = request.mutable_decode()->add_requests();
  decode->set_sequence_id(sequence);
  decode->set_seq_len(seq_len);
  if (new_key != nullptr) decode->set_keys(*new_key);
  request.set_queries(queries);
  return request;
}

TEST_F(EngineTest, SelectManyMergesIndependentCallsIntoOneLaunch) {
  const int32_t layer = kLastLayer;
  const uint64_t a = Open();
  const uint64_t b = Open();
  ASSERT_TRUE(AppendRandom(a, layer, 0, 700).ok());
  ASSERT_TRUE(AppendRandom(b, layer, 0, 1300).ok());
  Encoded queries_a = RandomQueries(1);
  Encoded queries_b = RandomQueries(1);
  Encoded bad_queries = RandomQueries(2);  // one row too many
  Encoded key_b = RandomKeys(1);
  std::vector<v1::SelectRequest> requests = {
      OneDecode(layer, a, 700, queries_a.bytes, nullptr),
      OneDecode(layer, a, 700, bad_queries.bytes, nullptr),
      OneDecode(layer, b, 1301, queries_b.bytes, &key_b.bytes),
  };
  requests[2].set_layout(v1::BLOCK_ID_LAYOUT_TOKEN_MAJOR);
  std::vector<v1::Selection> selections(requests.size());
  std::vector<SelectCall> calls;
  for (size_t i = 0; i < requests.size(); ++i) {
    calls.push_back({&requests[i], &selections[i], absl::OkStatus()});
  }
  const int64_t launches = engine_->select_launches();
  EXPECT_TRUE(SelectManyAndWait(absl::MakeSpan(calls)));
  EXPECT_EQ(engine_->select_launches(), launches + 1);

  ASSERT_TRUE(calls[0].status.ok()) << calls[0].status;
  EXPECT_EQ(calls[1].status.code(), absl::StatusCode::kInvalidArgument) << calls[1].status;
  EXPECT_TRUE(selections[1].block_ids().empty());
  ASSERT_TRUE(calls[2].status.ok()) << calls[2].status;
  Remember(b, layer, 1300, key_b.values);
  EXPECT_EQ(Ids(selections[0]), Reference({{KeysOf(a, layer), 699, 1}}, queries_a.values));
  EXPECT_EQ(selections[2].layout(), v1::BLOCK_ID_LAYOUT_TOKEN_MAJOR);
  EXPECT_EQ(selections[2].total_q(), 1u);
  // With one row, token-major and head-major ids are the same sequence.
  EXPECT_EQ(Ids(selections[2]), Reference({{KeysOf(b, layer), 1300, 1}}, queries_b.values));
}

TEST_F(EngineTest, SelectManyRunsCallsOfOneSequenceInOrder) {
  const int32_t layer = kFirstSparseLayer;
  const uint64_t a = Open();
  ASSERT_TRUE(AppendRandom(a, layer, 0, 1000).ok());
  Encoded first_key = RandomKeys(1);
  Encoded queries_1 = RandomQueries(1);
  // The second call rewrites tokens 801..1000 (a rejected draft) with keys
  // along the first call's query, so block 6 would win the first call's
  // selection if its append ran first.
  constexpr int32_t kRewritten = 200;
  std::string rewrite;
  for (int32_t token = 0; token < kRewritten; ++token) {
    rewrite += queries_1.bytes.substr(0, model_.head_dim * sizeof(uint16_t));
  }
  Encoded queries_2 = RandomQueries(kRewritten);
  std::vector<v1::SelectRequest> requests = {
      OneDecode(layer, a, 1001, queries_1.bytes, &first_key.bytes),
      OneDecode(layer, a, 1001, queries_2.bytes, &rewrite),
  };
  requests[1].mutable_decode()->set_tokens_per_request(kRewritten);
  std::vector<v1::Selection> selections(2);
  std::vector<SelectCall> calls = {{&requests[0], &selections[0], absl::OkStatus()},
                                   {&requests[1], &selections[1], absl::OkStatus()}};
  const int64_t launches = engine_->select_launches();
  EXPECT_TRUE(SelectManyAndWait(absl::MakeSpan(calls)));
  EXPECT_EQ(engine_->select_launches(), launches + 2);
  ASSERT_TRUE(calls[0].status.ok()) << calls[0].status;
  ASSERT_TRUE(calls[1].status.ok()) << calls[1].status;

  Remember(a, layer, 1000, first_key.values);
  const std::vector<int32_t> first = Ids(selections[0]);
  EXPECT_EQ(first, Reference({{KeysOf(a, layer), 1000, 1}}, queries_1.values));
  std::vector<float> rewritten_values;
  for (int32_t token = 0; token < kRewritten; ++token) {
    rewritten_values.insert(rewritten_values.end(), queries_1.values.begin(),
                            queries_1.values.begin() + model_.head_dim);
  }
  Remember(a, layer, 1001 - kRewritten, rewritten_values);
  EXPECT_EQ(Ids(selections[1]),
            Reference({{KeysOf(a, layer), 1001 - kRewritten, kRewritten}}, queries_2.values));
  // Head 0 of the first call, had it seen the rewrite: block 6 right after
  // the forced init (0) and local (7) blocks.
  const std::vector<int32_t> after_rewrite =
      Reference({{KeysOf(a, layer), 1000, 1}}, queries_1.values);
  ASSERT_EQ(after_rewrite[2], 6);
  EXPECT_NE(first, after_rewrite);
}

// Validation: every rejected request leaves the cache and the output as
// they were.
class EngineSelectValidationTest : public EngineTest {
 protected:
  static constexpr int64_t kReadyTokens = 300;

  void SetUp() override {
    EngineTest::SetUp();
    ready_ = Open();
    ASSERT_TRUE(AppendRandom(ready_, kFirstSparseLayer, 0, kReadyTokens).ok());
  }

  // A valid prefill of ready_'s last 100 tokens; cases break one field.
  v1::SelectRequest GoodPrefill(int32_t q_len = 100) {
    v1::SelectRequest request;
    request.set_request_id(5);
    request.set_layer(kFirstSparseLayer);
    v1::PrefillRequest* prefill = request.mutable_prefill()->add_requests();
    prefill->set_sequence_id(ready_);
    prefill->set_prefix_len(kReadyTokens - q_len);
    prefill->set_q_len(q_len);
    request.set_queries(RandomQueries(q_len).bytes);
    return request;
  }

  v1::SelectRequest GoodDecode(uint32_t tokens_per_request = 1) {
    v1::SelectRequest request;
    request.set_layer(kFirstSparseLayer);
    request.mutable_decode()->set_tokens_per_request(tokens_per_request);
    v1::DecodeRequest* decode = request.mutable_decode()->add_requests();
    decode->set_sequence_id(ready_);
    decode->set_seq_len(kReadyTokens);
    request.set_queries(RandomQueries(tokens_per_request).bytes);
    return request;
  }

  void ExpectRejected(const v1::SelectRequest& request, absl::StatusCode code) {
    const CacheStats before = engine_->cache_stats();
    v1::Selection selection;
    selection.set_topk(12345);  // a sentinel Select must not overwrite
    absl::Status status = engine_->Select(request, &selection);
    EXPECT_EQ(status.code(), code) << status;
    EXPECT_FALSE(status.message().empty());
    EXPECT_EQ(selection.topk(), 12345u);
    EXPECT_TRUE(selection.block_ids().empty());
    const CacheStats after = engine_->cache_stats();
    EXPECT_EQ(after.free_pages, before.free_pages);
    EXPECT_EQ(after.open_sequences, before.open_sequences);
    ExpectReadyFill(kReadyTokens);
  }

  // ready_ holds exactly `fill` tokens in the first sparse layer: a decode
  // at fill works and one at fill + 1 is refused for missing keys.
  void ExpectReadyFill(int64_t fill) {
    v1::SelectRequest at_fill = GoodDecode();
    at_fill.mutable_decode()->mutable_requests(0)->set_seq_len(fill);
    v1::Selection selection;
    EXPECT_TRUE(engine_->Select(at_fill, &selection).ok());
    at_fill.mutable_decode()->mutable_requests(0)->set_seq_len(fill + 1);
    EXPECT_EQ(engine_->Select(at_fill, &selection).code(), absl::StatusCode::kFailedPrecondition);
  }

  uint64_t ready_ = 0;
};

TEST_F(EngineSelectValidationTest, GoodRequestsPass) {
  v1::Selection selection;
  EXPECT_TRUE(engine_->Select(GoodPrefill(), &selection).ok());
  EXPECT_TRUE(engine_->Select(GoodDecode(), &selection).ok());
  EXPECT_TRUE(engine_->Select(GoodDecode(3), &selection).ok());
}

TEST_F(EngineSelectValidationTest, NonSparseLayerIsInvalidArgument) {
  v1::SelectRequest dense = GoodPrefill();
  dense.set_layer(0);
  ExpectRejected(dense, absl::StatusCode::kInvalidArgument);
  v1::SelectRequest past_the_model = GoodPrefill();
  past_the_model.set_layer(4);
  ExpectRejected(past_the_model, absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineSelectValidationTest, NeitherPrefillNorDecodeIsInvalidArgument) {
  v1::SelectRequest request = GoodPrefill();
  request.clear_prefill();
  ExpectRejected(request, absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineSelectValidationTest, EmptyBatchIsInvalidArgument) {
  v1::SelectRequest prefill = GoodPrefill();
  prefill.mutable_prefill()->clear_requests();
  prefill.clear_queries();
  ExpectRejected(prefill, absl::StatusCode::kInvalidArgument);
  v1::SelectRequest decode = GoodDecode();
  decode.mutable_decode()->clear_requests();
  decode.clear_queries();
  ExpectRejected(decode, absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineSelectValidationTest, WrongQueryByteSizeIsInvalidArgument) {
  v1::SelectRequest short_queries = GoodPrefill();
  short_queries.mutable_queries()->resize(short_queries.queries().size() - 2);
  ExpectRejected(short_queries, absl::StatusCode::kInvalidArgument);
  v1::SelectRequest extra_row = GoodDecode();
  extra_row.mutable_queries()->append(RandomQueries(1).bytes);
  ExpectRejected(extra_row, absl::StatusCode::kInvalidArgument);
  v1::SelectRequest none = GoodDecode();
  none.clear_queries();
  ExpectRejected(none, absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineSelectValidationTest, ZeroQLenIsInvalidArgument) {
  v1::SelectRequest request = GoodPrefill();
  request.mutable_prefill()->mutable_requests(0)->set_q_len(0);
  request.clear_queries();
  ExpectRejected(request, absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineSelectValidationTest, DecodeSeqLenBelowQIsInvalidArgument) {
  v1::SelectRequest request = GoodDecode(4);
  request.mutable_decode()->mutable_requests(0)->set_seq_len(3);
  ExpectRejected(request, absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineSelectValidationTest, PositionsPastMaxPositionsAreInvalidArgument) {
  v1::SelectRequest prefill = GoodPrefill(100);
  prefill.mutable_prefill()->mutable_requests(0)->set_prefix_len(4000);
  ExpectRejected(prefill, absl::StatusCode::kInvalidArgument);
  v1::SelectRequest huge_prefix = GoodPrefill(100);
  huge_prefix.mutable_prefill()->mutable_requests(0)->set_prefix_len(~uint64_t{0} - 10);
  ExpectRejected(huge_prefix, absl::StatusCode::kInvalidArgument);
  v1::SelectRequest decode = GoodDecode();
  decode.mutable_decode()->mutable_requests(0)->set_seq_len(4097);
  ExpectRejected(decode, absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineSelectValidationTest, DuplicateSequenceIsInvalidArgument) {
  v1::SelectRequest request = GoodPrefill(50);
  *request.mutable_prefill()->add_requests() = request.prefill().requests(0);
  request.set_queries(RandomQueries(100).bytes);
  ExpectRejected(request, absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineSelectValidationTest, UnknownSequenceIsNotFound) {
  v1::SelectRequest request = GoodDecode();
  request.mutable_decode()->mutable_requests(0)->set_sequence_id(ready_ + 1000);
  ExpectRejected(request, absl::StatusCode::kNotFound);
}

TEST_F(EngineSelectValidationTest, MissingKeysAreFailedPrecondition) {
  v1::SelectRequest past_fill = GoodPrefill(100);
  past_fill.mutable_prefill()->mutable_requests(0)->set_prefix_len(kReadyTokens - 99);
  ExpectRejected(past_fill, absl::StatusCode::kFailedPrecondition);
  // Keys of one layer do not serve another.
  v1::SelectRequest other_layer = GoodPrefill();
  other_layer.set_layer(kFirstSparseLayer + 1);
  ExpectRejected(other_layer, absl::StatusCode::kFailedPrecondition);
  // Keys in the request that start past the fill leave a gap.
  v1::SelectRequest gap = GoodDecode();
  gap.mutable_decode()->mutable_requests(0)->set_seq_len(kReadyTokens + 2);
  gap.mutable_decode()->mutable_requests(0)->set_keys(RandomKeys(1).bytes);
  ExpectRejected(gap, absl::StatusCode::kFailedPrecondition);
}

TEST_F(EngineSelectValidationTest, RequestKeysOfTheWrongSizeAreInvalidArgument) {
  v1::SelectRequest request = GoodDecode(2);
  request.mutable_decode()->mutable_requests(0)->set_seq_len(kReadyTokens + 2);
  request.mutable_decode()->mutable_requests(0)->set_keys(RandomKeys(3).bytes);
  ExpectRejected(request, absl::StatusCode::kInvalidArgument);
  v1::SelectRequest odd_bytes = GoodPrefill(10);
  odd_bytes.mutable_prefill()->mutable_requests(0)->set_keys(RandomKeys(10).bytes.substr(1));
  ExpectRejected(odd_bytes, absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineSelectValidationTest, KeyDtypeMismatchIsInvalidArgument) {
  v1::SelectRequest request = GoodDecode();
  request.set_key_dtype(v1::KEY_DTYPE_FP8_E4M3);
  ExpectRejected(request, absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineSelectValidationTest, UnsupportedQueryDtypeIsInvalidArgument) {
  v1::SelectRequest request = GoodDecode();
  // An enum value from a newer client: proto3 keeps unknown enum values.
  request.set_query_dtype(static_cast<v1::QueryDtype>(7));
  ExpectRejected(request, absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineSelectValidationTest, UnknownLayoutIsInvalidArgument) {
  v1::SelectRequest request = GoodDecode();
  request.set_layout(static_cast<v1::BlockIdLayout>(7));
  ExpectRejected(request, absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineSelectValidationTest, UnknownKeyDtypeIsInvalidArgument) {
  v1::SelectRequest request = GoodDecode();
  request.set_key_dtype(static_cast<v1::KeyDtype>(9));
  ExpectRejected(request, absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineSelectValidationTest, PaddingRequestWithKeysIsInvalidArgument) {
  v1::SelectRequest request = GoodDecode();
  v1::DecodeRequest* padding = request.mutable_decode()->add_requests();
  padding->set_seq_len(0);
  padding->set_keys(RandomKeys(1).bytes);
  request.set_queries(RandomQueries(2).bytes);
  ExpectRejected(request, absl::StatusCode::kInvalidArgument);
}

TEST_F(EngineSelectValidationTest, OneBadRequestKeepsTheOthersKeysOut) {
  // Request 0 carries valid keys for ready_; request 1 names no open
  // sequence. Neither request's keys may land.
  v1::SelectRequest request;
  request.set_layer(kFirstSparseLayer);
  v1::DecodeRequest* good = request.mutable_decode()->add_requests();
  good->set_sequence_id(ready_);
  good->set_seq_len(kReadyTokens + 1);
  good->set_keys(RandomKeys(1).bytes);
  v1::DecodeRequest* bad = request.mutable_decode()->add_requests();
  bad->set_sequence_id(ready_ + 1000);
  bad->set_seq_len(10);
  bad->set_keys(RandomKeys(1).bytes);
  request.set_queries(RandomQueries(2).bytes);
  ExpectRejected(request, absl::StatusCode::kNotFound);
}

TEST_F(EngineSelectValidationTest, FullCacheIsResourceExhaustedAndChangesNothing) {
  // Leave one free page, then ask for three in a batch whose other request
  // would fit.
  const uint64_t hog = Open();
  ASSERT_TRUE(AppendRandom(hog, kFirstSparseLayer, 0, (kPages - 4) * 128).ok());
  ASSERT_EQ(FreePages(), 1);
  const uint64_t fresh = Open();
  v1::SelectRequest request;
  request.set_layer(kFirstSparseLayer);
  v1::PrefillRequest* fits = request.mutable_prefill()->add_requests();
  fits->set_sequence_id(ready_);
  fits->set_prefix_len(kReadyTokens);
  fits->set_q_len(10);
  fits->set_keys(RandomKeys(10).bytes);
  v1::PrefillRequest* too_big = request.mutable_prefill()->add_requests();
  too_big->set_sequence_id(fresh);
  too_big->set_q_len(300);
  too_big->set_keys(RandomKeys(300).bytes);
  request.set_queries(RandomQueries(310).bytes);
  ExpectRejected(request, absl::StatusCode::kResourceExhausted);

  // The sequences already there are still served correctly.
  Encoded queries = RandomQueries(1);
  v1::SelectRequest decode;
  decode.set_layer(kFirstSparseLayer);
  v1::DecodeRequest* hog_decode = decode.mutable_decode()->add_requests();
  hog_decode->set_sequence_id(hog);
  hog_decode->set_seq_len((kPages - 4) * 128);
  decode.set_queries(queries.bytes);
  v1::Selection selection;
  ASSERT_TRUE(engine_->Select(decode, &selection).ok());
  EXPECT_EQ(Ids(selection), Reference({{KeysOf(hog, kFirstSparseLayer), (kPages - 4) * 128 - 1, 1}},
                                      queries.values));
}

}  // namespace
}  // namespace blocksel
