#include "kernels/cpu/cpu_selector.h"

#include <algorithm>
#include <limits>
#include <thread>

#include "kernels/cpu/top_blocks.h"
#include "kernels/numeric_formats.h"

namespace blocksel::cpu {
namespace {

// Block scores of one wave of tiles stay under this many floats (64 MiB), so
// a long prefill needs memory proportional to the rows of one wave, not to
// its whole score tensor.
constexpr int64_t kMaxWaveScores = int64_t{16} << 20;

int ResolveThreads(int requested) {
  if (requested > 0) return requested;
  const unsigned hardware = std::thread::hardware_concurrency();
  return hardware == 0 ? 1 : static_cast<int>(hardware);
}

}  // namespace

CpuSelector::CpuSelector(int num_threads)
    : pool_(ResolveThreads(num_threads)), page_scratch_(pool_.num_threads()) {}

KernelStatus CpuSelector::Select(const SelectionShape& shape, const SelectionBatch& batch) {
  const KernelStatus valid = ValidateSelection(shape, batch);
  if (valid != KernelStatus::kOk) return valid;
  const int32_t heads = shape.num_heads;
  const int32_t dim = shape.head_dim;

  const PageScorer& scorer = BestPageScorer(dim);
  const int64_t query_vectors = static_cast<int64_t>(batch.total_rows) * heads;
  widened_queries_.resize(query_vectors * dim);
  for (int64_t i = 0; i < query_vectors * dim; ++i) {
    widened_queries_[i] = Bf16ToFloat(batch.queries[i]);
  }
  queries_.resize(query_vectors * dim);
  scorer.prepare_queries(widened_queries_.data(), query_vectors, dim, queries_.data());
  for (std::vector<float>& scratch : page_scratch_) {
    scratch.resize(PageScratchFloats(dim, kTileRows * heads));
  }

  // Padding rows (negative positions) are answered here; real rows go into
  // tiles whose rows all sit at non-negative positions.
  std::vector<Tile> all_tiles;
  for (int32_t s = 0; s < batch.num_spans; ++s) {
    const RowSpan& span = batch.spans[s];
    int32_t row = 0;
    for (; row < span.num_rows && span.first_position + row < 0; ++row) {
      for (int32_t head = 0; head < heads; ++head) {
        const int64_t out_row =
            static_cast<int64_t>(head) * batch.total_rows + span.first_row + row;
        std::fill_n(batch.block_ids + out_row * shape.topk, shape.topk, -1);
        if (batch.block_scores != nullptr) {
          std::fill_n(batch.block_scores + out_row * batch.max_blocks, batch.max_blocks,
                      -std::numeric_limits<float>::infinity());
        }
      }
    }
    for (; row < span.num_rows; row += kTileRows) {
      const int32_t rows = std::min(kTileRows, span.num_rows - row);
      const int64_t last_position = static_cast<int64_t>(span.first_position) + row + rows - 1;
      const int32_t blocks = VisibleBlocks(last_position);
      if (batch.block_scores != nullptr && blocks > batch.max_blocks) {
        return KernelStatus::kInvalidArgument;
      }
      for (int32_t b = 0; b < blocks; ++b) {
        const int32_t page = span.block_table[b];
        if (page < 0 || page >= batch.num_pages) {
          return KernelStatus::kInvalidArgument;
        }
      }
      all_tiles.push_back({&span, row, rows, blocks, 0});
    }
  }

  // Waves of tiles bound the score buffer; each wave scores, then selects.
  const int threads = pool_.num_threads();
  size_t next_tile = 0;
  while (next_tile < all_tiles.size()) {
    std::vector<Tile> wave;
    int64_t wave_scores = 0;
    while (next_tile < all_tiles.size()) {
      Tile tile = all_tiles[next_tile];
      const int64_t scores = static_cast<int64_t>(tile.num_rows) * heads * tile.num_blocks;
      if (!wave.empty() && wave_scores + scores > kMaxWaveScores) break;
      tile.score_offset = wave_scores;
      wave_scores += scores;
      wave.push_back(tile);
      ++next_tile;
    }
    block_scores_.resize(wave_scores);

    // Enough block ranges for every thread to stay busy even when the wave
    // is one long decode request, but no range shorter than 8 pages.
    int64_t total_blocks = 0;
    for (const Tile& tile : wave) total_blocks += tile.num_blocks;
    const int64_t target_items = static_cast<int64_t>(threads) * 4;
    const int32_t blocks_per_item = static_cast<int32_t>(
        std::max<int64_t>(8, (total_blocks + target_items - 1) / target_items));
    std::vector<WorkItem> items;
    for (int32_t t = 0; t < static_cast<int32_t>(wave.size()); ++t) {
      for (int32_t b = 0; b < wave[t].num_blocks; b += blocks_per_item) {
        items.push_back({t, b, std::min(wave[t].num_blocks, b + blocks_per_item)});
      }
    }
    ScoreItems(scorer, shape, batch, wave, items);
    SelectRows(shape, batch, wave);
  }
  return KernelStatus::kOk;
}

void CpuSelector::ScoreItems(const PageScorer& scorer, const SelectionShape& shape,
                             const SelectionBatch& batch, const std::vector<Tile>& tiles,
                             const std::vector<WorkItem>& items) {
  const int32_t heads = shape.num_heads;
  const int32_t dim = shape.head_dim;
  const int64_t page_bytes =
      static_cast<int64_t>(kBlockSize) * dim * KeyDtypeBytes(shape.key_dtype);
  const auto* pool = static_cast<const uint8_t*>(batch.key_pool);
  pool_.ParallelFor(static_cast<int64_t>(items.size()), [&](int thread_index, int64_t i) {
    const WorkItem& item = items[i];
    const Tile& tile = tiles[item.tile];
    const int32_t first_row = tile.span->first_row + tile.first_row_in_span;
    const int64_t first_position =
        static_cast<int64_t>(tile.span->first_position) + tile.first_row_in_span;
    int32_t visible[kTileRows];
    float maxima[kTileRows * kMaxHeads];
    PageScoreArgs args;
    args.key_dtype = shape.key_dtype;
    args.head_dim = dim;
    args.queries = queries_.data() + static_cast<int64_t>(first_row) * heads * dim;
    args.num_rows = tile.num_rows;
    args.num_heads = heads;
    args.visible_keys = visible;
    args.page_scratch = page_scratch_[thread_index].data();
    args.block_max = maxima;
    for (int32_t block = item.first_block; block < item.end_block; ++block) {
      const int64_t block_start = static_cast<int64_t>(block) * kBlockSize;
      for (int32_t r = 0; r < tile.num_rows; ++r) {
        const int64_t seen = first_position + r - block_start + 1;
        visible[r] = static_cast<int32_t>(std::clamp<int64_t>(seen, 0, kBlockSize));
      }
      args.page = pool + tile.span->block_table[block] * page_bytes;
      args.next_page = block + 1 < item.end_block
                           ? pool + tile.span->block_table[block + 1] * page_bytes
                           : nullptr;
      scorer.score_page(args);
      float* scores = block_scores_.data() + tile.score_offset;
      for (int32_t r = 0; r < tile.num_rows; ++r) {
        if (visible[r] == 0) continue;
        for (int32_t head = 0; head < heads; ++head) {
          scores[(static_cast<int64_t>(r) * heads + head) * tile.num_blocks + block] =
              maxima[r * heads + head];
        }
      }
    }
  });
}

void CpuSelector::SelectRows(const SelectionShape& shape, const SelectionBatch& batch,
                             const std::vector<Tile>& tiles) {
  const int32_t heads = shape.num_heads;
  pool_.ParallelFor(static_cast<int64_t>(tiles.size()), [&](int /*thread_index*/, int64_t t) {
    const Tile& tile = tiles[t];
    const float* scores = block_scores_.data() + tile.score_offset;
    for (int32_t r = 0; r < tile.num_rows; ++r) {
      const int32_t row_in_span = tile.first_row_in_span + r;
      const int64_t position = static_cast<int64_t>(tile.span->first_position) + row_in_span;
      const int64_t row = tile.span->first_row + row_in_span;
      const int32_t valid = VisibleBlocks(position);
      for (int32_t head = 0; head < heads; ++head) {
        const float* row_scores =
            scores + (static_cast<int64_t>(r) * heads + head) * tile.num_blocks;
        const int64_t out_row = static_cast<int64_t>(head) * batch.total_rows + row;
        SelectTopBlocks(row_scores, valid, shape.topk, shape.init_blocks, shape.local_blocks,
                        batch.block_ids + out_row * shape.topk);
        if (batch.block_scores != nullptr) {
          float* out = batch.block_scores + out_row * batch.max_blocks;
          std::copy_n(row_scores, valid, out);
          std::fill(out + valid, out + batch.max_blocks, -std::numeric_limits<float>::infinity());
        }
      }
    }
  });
}

}  // namespace blocksel::cpu
