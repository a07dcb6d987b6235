#include "tests/support/random_batch.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "kernels/numeric_formats.h"

namespace blocksel::testing {

SelectionBatch SelectionProblem::Batch(int32_t* out) const {
  SelectionBatch batch;
  batch.key_pool = pool.data();
  batch.num_pages = num_pages;
  batch.spans = spans.data();
  batch.num_spans = static_cast<int32_t>(spans.size());
  batch.queries = queries.data();
  batch.total_rows = total_rows;
  batch.block_ids = out;
  return batch;
}

std::vector<int32_t> SelectionProblem::Reference() const {
  return ReferenceSelect(shape, reference_rows, query_values.data());
}

int64_t SelectionProblem::PositionOf(int32_t row) const {
  for (const RowSpan& span : spans) {
    if (row >= span.first_row && row < span.first_row + span.num_rows) {
      return static_cast<int64_t>(span.first_position) + row - span.first_row;
    }
  }
  return -1;
}

std::vector<double> SelectionProblem::Priorities(int32_t head, int32_t row) const {
  size_t request = 0;
  while (!(row >= spans[request].first_row &&
           row < spans[request].first_row + spans[request].num_rows)) {
    ++request;
  }
  const int64_t position = PositionOf(row);
  if (position < 0) return {};
  std::vector<double> priorities = ReferenceBlockScores(
      shape.head_dim, key_values[request].data(), position,
      query_values.data() + (static_cast<int64_t>(row) * shape.num_heads + head) * shape.head_dim);
  ApplyForcedPriorities(shape, &priorities);
  return priorities;
}

SelectionShape M3Shape(KeyDtype dtype) {
  SelectionShape shape;
  shape.num_heads = 4;
  shape.head_dim = 128;
  shape.key_dtype = dtype;
  shape.topk = 16;
  shape.init_blocks = 0;
  shape.local_blocks = 1;
  return shape;
}

ProblemBuilder::ProblemBuilder(const SelectionShape& shape, uint64_t seed, Values values)
    : shape_(shape), random_(seed), values_(values) {}

float ProblemBuilder::Draw() {
  if (values_ == Values::kSmallIntegers) {
    return static_cast<float>(std::uniform_int_distribution<int>(-3, 3)(random_));
  }
  return std::normal_distribution<float>(0.0f, 1.0f)(random_);
}

ProblemBuilder& ProblemBuilder::AddRequest(int64_t sequence_tokens, int64_t first_position,
                                           int32_t num_rows) {
  Pending pending{sequence_tokens, first_position, num_rows, false, {}};
  pending.keys.resize(sequence_tokens * shape_.head_dim);
  for (float& v : pending.keys) v = Draw();
  requests_.push_back(std::move(pending));
  for (int64_t i = 0; i < int64_t{num_rows} * shape_.num_heads * shape_.head_dim; ++i) {
    query_raw_.push_back(Draw());
  }
  return *this;
}

ProblemBuilder& ProblemBuilder::AddPadding(int32_t num_rows) {
  requests_.push_back({0, -num_rows, num_rows, true, {}});
  for (int64_t i = 0; i < int64_t{num_rows} * shape_.num_heads * shape_.head_dim; ++i) {
    query_raw_.push_back(Draw());
  }
  return *this;
}

ProblemBuilder& ProblemBuilder::SetKey(int request, int64_t token, int32_t element, float value) {
  requests_[request].keys[token * shape_.head_dim + element] = value;
  return *this;
}

ProblemBuilder& ProblemBuilder::SetQuery(int32_t row, int32_t head, int32_t element, float value) {
  query_raw_[(static_cast<int64_t>(row) * shape_.num_heads + head) * shape_.head_dim + element] =
      value;
  return *this;
}

SelectionProblem ProblemBuilder::Build() {
  SelectionProblem problem;
  problem.shape = shape_;
  const int64_t dim = shape_.head_dim;
  const int64_t element_bytes = KeyDtypeBytes(shape_.key_dtype);
  const int64_t page_bytes = kBlockSize * dim * element_bytes;
  int64_t pages = 0;
  for (const Pending& r : requests_) pages += (r.sequence_tokens + kBlockSize - 1) / kBlockSize;
  // Spare pages that belong to nobody, so page ids are not dense.
  problem.num_pages = pages + 3;
  problem.pool.resize(problem.num_pages * page_bytes);
  for (uint8_t& byte : problem.pool) byte = static_cast<uint8_t>(random_());
  std::vector<int32_t> order(problem.num_pages);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), random_);

  size_t next_page = 0;
  int32_t row = 0;
  problem.block_tables.resize(requests_.size());
  problem.key_values.resize(requests_.size());
  for (size_t i = 0; i < requests_.size(); ++i) {
    const Pending& r = requests_[i];
    std::vector<int32_t>& table = problem.block_tables[i];
    std::vector<float>& values = problem.key_values[i];
    values.resize(r.keys.size());
    for (int64_t token = 0; token < r.sequence_tokens; ++token) {
      if (token % kBlockSize == 0) table.push_back(order[next_page++]);
      uint8_t* destination = problem.pool.data() + table.back() * page_bytes +
                             (token % kBlockSize) * dim * element_bytes;
      for (int64_t d = 0; d < dim; ++d) {
        const float raw = r.keys[token * dim + d];
        if (shape_.key_dtype == KeyDtype::kBf16) {
          const uint16_t bits = FloatToBf16(raw);
          std::memcpy(destination + d * 2, &bits, 2);
          values[token * dim + d] = Bf16ToFloat(bits);
        } else {
          const uint8_t bits = FloatToFp8E4m3(raw);
          destination[d] = bits;
          values[token * dim + d] = Fp8E4m3ToFloat(bits);
        }
      }
    }
    RowSpan span;
    span.block_table = r.padding ? nullptr : table.data();
    span.first_position = static_cast<int32_t>(r.first_position);
    span.num_rows = r.num_rows;
    span.first_row = row;
    problem.spans.push_back(span);
    problem.reference_rows.push_back(
        {r.padding ? nullptr : values.data(), r.first_position, r.num_rows});
    row += r.num_rows;
  }
  problem.total_rows = row;
  problem.queries.resize(query_raw_.size());
  problem.query_values.resize(query_raw_.size());
  for (size_t i = 0; i < query_raw_.size(); ++i) {
    problem.queries[i] = FloatToBf16(query_raw_[i]);
    problem.query_values[i] = Bf16ToFloat(problem.queries[i]);
  }
  return problem;
}

SelectionProblem RandomProblem(uint64_t seed, Values values) {
  std::mt19937_64 random(seed);
  auto pick = [&](std::initializer_list<int> options) {
    return *(options.begin() + random() % options.size());
  };
  SelectionShape shape;
  shape.num_heads = pick({1, 2, 4, 8});
  shape.head_dim = pick({16, 32, 64, 128, 256});
  shape.key_dtype = random() % 2 ? KeyDtype::kBf16 : KeyDtype::kFp8E4m3;
  shape.topk = pick({1, 2, 4, 16, 33});
  shape.init_blocks = pick({0, 0, 1, 2});
  shape.local_blocks = pick({0, 1, 1, 3});
  ProblemBuilder builder(shape, seed * 7919 + 1, values);
  const int requests = 1 + static_cast<int>(random() % 4);
  const bool decode = random() % 2;
  const int q = pick({1, 1, 2, 4});
  for (int r = 0; r < requests; ++r) {
    if (decode && random() % 5 == 0) {
      builder.AddPadding(q);
      continue;
    }
    const int64_t tokens = 1 + static_cast<int64_t>(random() % 3000);
    if (decode) {
      const int rows = static_cast<int>(std::min<int64_t>(q, tokens));
      builder.AddRequest(tokens, tokens - rows, rows);
    } else {
      const int64_t rows = 1 + static_cast<int64_t>(random() % std::min<int64_t>(tokens, 150));
      const int64_t prefix = tokens - rows;
      builder.AddRequest(tokens, prefix, static_cast<int32_t>(rows));
    }
  }
  return builder.Build();
}

std::string CompareWithOracle(const SelectionProblem& problem, const std::vector<int32_t>& got,
                              double tolerance) {
  const std::vector<int32_t> expected = problem.Reference();
  if (got.size() != expected.size()) {
    return absl::StrCat("size ", got.size(), " != ", expected.size());
  }
  const int32_t topk = problem.shape.topk;
  for (int32_t head = 0; head < problem.shape.num_heads; ++head) {
    for (int32_t row = 0; row < problem.total_rows; ++row) {
      const int64_t offset = (static_cast<int64_t>(head) * problem.total_rows + row) * topk;
      const std::vector<int32_t> want(expected.begin() + offset, expected.begin() + offset + topk);
      const std::vector<int32_t> have(got.begin() + offset, got.begin() + offset + topk);
      if (want == have) continue;
      const std::string where = absl::StrCat(
          "head ", head, " row ", row, " (position ", problem.PositionOf(row), "): expected [",
          absl::StrJoin(want, " "), "], got [", absl::StrJoin(have, " "), "]");
      // Same number of real ids and of padding, in the same slots.
      for (int32_t k = 0; k < topk; ++k) {
        if ((want[k] < 0) != (have[k] < 0)) return where;
      }
      const std::vector<double> priority = problem.Priorities(head, row);
      std::vector<bool> chosen(priority.size(), false);
      double lowest_chosen = INFINITY;
      for (int32_t k = 0; k < topk && have[k] >= 0; ++k) {
        if (have[k] >= static_cast<int32_t>(priority.size()) || chosen[have[k]]) return where;
        chosen[have[k]] = true;
        lowest_chosen = std::min(lowest_chosen, priority[have[k]]);
        if (k > 0 && priority[have[k]] > priority[have[k - 1]] + tolerance) return where;
      }
      for (size_t block = 0; block < priority.size(); ++block) {
        if (!chosen[block] && priority[block] > lowest_chosen + tolerance) return where;
      }
    }
  }
  return "";
}

}  // namespace blocksel::testing
