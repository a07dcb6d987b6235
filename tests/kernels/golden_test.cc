// The golden cases (checked against vLLM) through the CPU kernel and through
// the engine: exact block ids, order included.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>

#include "client/encoding.h"
#include "client/reference_selection.h"
#include "gtest/gtest.h"
#include "kernels/cpu/cpu_selector.h"
#include "server/engine/backend_factory.h"
#include "server/engine/engine.h"
#include "tests/support/golden_case.h"

namespace blocksel {
namespace {

using testing::GoldenCase;
using testing::GoldenFiles;
using testing::LoadGoldenCase;

TEST(Golden, AllCasesArePresent) { EXPECT_EQ(GoldenFiles().size(), 14u); }

// Pages in shuffled order, every slot prefilled with random garbage: the
// tail of the last page of each sequence must never matter.
TEST(Golden, CpuKernelReproducesEveryCase) {
  for (const std::string& file : GoldenFiles()) {
    const GoldenCase golden = LoadGoldenCase(file);
    SCOPED_TRACE(golden.name);
    const int64_t token_bytes =
        int64_t{golden.shape.head_dim} * KeyDtypeBytes(golden.shape.key_dtype);
    const int64_t page_bytes = token_bytes * kBlockSize;
    int64_t pages = 0;
    for (const auto& r : golden.requests) pages += (r.seq_len + kBlockSize - 1) / kBlockSize;
    std::mt19937_64 random(42);
    std::vector<uint8_t> pool((pages + 2) * page_bytes);
    for (uint8_t& byte : pool) byte = static_cast<uint8_t>(random());
    std::vector<int32_t> order(pages + 2);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), random);

    std::vector<std::vector<int32_t>> tables(golden.requests.size());
    std::vector<RowSpan> spans;
    std::string queries;
    size_t next_page = 0;
    int32_t row = 0;
    for (size_t i = 0; i < golden.requests.size(); ++i) {
      const auto& r = golden.requests[i];
      for (int64_t token = 0; token < r.seq_len; ++token) {
        if (token % kBlockSize == 0) tables[i].push_back(order[next_page++]);
        std::memcpy(
            pool.data() + tables[i].back() * page_bytes + (token % kBlockSize) * token_bytes,
            r.keys.data() + token * token_bytes, token_bytes);
      }
      RowSpan span;
      span.block_table = tables[i].data();
      span.first_position = static_cast<int32_t>(r.seq_len == 0 ? -r.q_len : r.prefix_len);
      span.num_rows = r.q_len;
      span.first_row = row;
      spans.push_back(span);
      queries += r.queries;
      row += r.q_len;
    }
    SelectionBatch batch;
    batch.key_pool = pool.data();
    batch.num_pages = static_cast<int64_t>(order.size());
    batch.spans = spans.data();
    batch.num_spans = static_cast<int32_t>(spans.size());
    batch.queries = reinterpret_cast<const uint16_t*>(queries.data());
    batch.total_rows = row;
    for (int threads : {1, 2}) {
      std::vector<int32_t> out(golden.ExpectedBatch().size(), -7);
      batch.block_ids = out.data();
      cpu::CpuSelector selector(threads);
      ASSERT_EQ(selector.Select(golden.shape, batch), KernelStatus::kOk);
      EXPECT_EQ(out, golden.ExpectedBatch()) << threads << " threads";
    }
  }
}

// The block scores a selection returned against the float64 reference:
// within rounding where a row sees the block, exactly -inf elsewhere.
void ExpectReferenceBlockScores(const GoldenCase& golden, const v1::Selection& selection) {
  const int32_t heads = golden.shape.num_heads;
  const int32_t dim = golden.shape.head_dim;
  const int32_t rows = golden.total_rows();
  const int32_t max_blocks = static_cast<int32_t>(selection.max_blocks());
  ASSERT_EQ(selection.block_scores().size(), size_t{4} * heads * rows * max_blocks);
  std::vector<float> scores(selection.block_scores().size() / 4);
  std::memcpy(scores.data(), selection.block_scores().data(), selection.block_scores().size());
  const v1::KeyDtype dtype =
      golden.shape.key_dtype == KeyDtype::kBf16 ? v1::KEY_DTYPE_BF16 : v1::KEY_DTYPE_FP8_E4M3;
  int32_t row = 0;
  for (const auto& r : golden.requests) {
    const std::vector<float> keys = DecodeKeys(r.keys, dtype);
    const std::vector<float> queries = DecodeBf16(r.queries);
    for (int32_t i = 0; i < r.q_len; ++i, ++row) {
      const int64_t position = r.seq_len == 0 ? -1 : r.prefix_len + i;
      for (int32_t head = 0; head < heads; ++head) {
        const std::vector<double> expected =
            position < 0 ? std::vector<double>()
                         : ReferenceBlockScores(dim, keys.data(), position,
                                                queries.data() + (int64_t{i} * heads + head) * dim);
        const float* got = scores.data() + (int64_t{head} * rows + row) * max_blocks;
        for (int32_t block = 0; block < max_blocks; ++block) {
          if (block < static_cast<int32_t>(expected.size())) {
            ASSERT_NEAR(got[block], expected[block], 1e-3 * (1 + std::fabs(expected[block])))
                << "row " << row << " head " << head << " block " << block;
          } else {
            ASSERT_EQ(got[block], -INFINITY) << "row " << row << " block " << block;
          }
        }
      }
    }
  }
}

// The same cases through the server-side path on every backend this
// build and machine have: AppendKeys, then one SelectRequest per case,
// decoded from the response bytes.
class GoldenEngineTest : public ::testing::TestWithParam<std::string> {};

INSTANTIATE_TEST_SUITE_P(Backends, GoldenEngineTest, ::testing::Values("cpu", "gpu"));

TEST_P(GoldenEngineTest, ReproducesEveryCase) {
  BackendOptions backend_options;
  backend_options.kind = GetParam() == "cpu" ? "cpu" : "auto";
  for (const std::string& file : GoldenFiles()) {
    const GoldenCase golden = LoadGoldenCase(file);
    SCOPED_TRACE(golden.name);
    EngineOptions options;
    options.model.num_layers = 2;
    options.model.first_sparse_layer = 1;
    options.model.num_heads = golden.shape.num_heads;
    options.model.head_dim = golden.shape.head_dim;
    options.model.key_dtype = golden.shape.key_dtype;
    options.model.topk = golden.shape.topk;
    options.model.init_blocks = golden.shape.init_blocks;
    options.model.local_blocks = golden.shape.local_blocks;
    options.num_pages = 512;
    auto backend = CreateBackend(backend_options, options.model, options.num_pages);
    ASSERT_TRUE(backend.ok()) << backend.status();
    if (GetParam() == "gpu" && (*backend)->name() == "cpu") {
      GTEST_SKIP() << "no GPU backend on this build or machine";
    }
    Engine engine(options, std::move(*backend));

    v1::SelectRequest select;
    select.set_layer(1);
    std::string queries;
    for (const auto& r : golden.requests) {
      uint64_t id = 0;
      if (r.seq_len > 0) {
        auto opened = engine.OpenSequence(v1::OpenSequenceRequest());
        ASSERT_TRUE(opened.ok());
        id = opened->sequence_id();
        v1::AppendKeysRequest append;
        v1::KeyAppend* keys = append.add_appends();
        keys->set_sequence_id(id);
        keys->set_first_layer(1);
        keys->set_num_tokens(static_cast<uint32_t>(r.seq_len));
        keys->set_keys(r.keys);
        ASSERT_TRUE(engine.AppendKeys(append).ok());
      }
      if (golden.decode) {
        v1::DecodeRequest* decode = select.mutable_decode()->add_requests();
        decode->set_sequence_id(id);
        decode->set_seq_len(r.seq_len);
        decode->set_query_tokens(r.q_len);
      } else {
        v1::PrefillRequest* prefill = select.mutable_prefill()->add_requests();
        prefill->set_sequence_id(id);
        prefill->set_prefix_len(r.prefix_len);
        prefill->set_q_len(r.q_len);
      }
      queries += r.queries;
    }
    select.set_queries(queries);
    // With block scores (direct launches), then ids alone (a captured
    // decode graph where one fits).
    for (bool scores : {true, false}) {
      SCOPED_TRACE(scores ? "with block scores" : "ids only");
      select.set_return_block_scores(scores);
      v1::Selection selection;
      ASSERT_TRUE(engine.Select(select, &selection).ok());
      auto ids = DecodeBlockIds(selection);
      ASSERT_TRUE(ids.ok());
      EXPECT_EQ(*ids, golden.ExpectedBatch());
      if (scores) ExpectReferenceBlockScores(golden, selection);
    }
  }
}

}  // namespace
}  // namespace blocksel
