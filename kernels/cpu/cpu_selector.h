// The CPU selection backend: block scores and top-k for one batch.
#ifndef BLOCKSEL_KERNELS_CPU_CPU_SELECTOR_H_
#define BLOCKSEL_KERNELS_CPU_CPU_SELECTOR_H_

#include <cstdint>
#include <vector>

#include "kernels/cpu/page_scorer.h"
#include "kernels/cpu/thread_pool.h"
#include "kernels/selection_types.h"

namespace blocksel::cpu {

// Computes SEMANTICS.md selections on the CPU.
//
// Every key page a request can see is read once per tile of up to
// kTileRows query rows of that request, and scored against all H heads of
// those rows while it is hot in cache. Work is split over (row tile, block
// range) pairs so that a single long decode request uses every thread.
//
// Thread-safety: Select may be called by one thread at a time (it reuses
// scratch buffers and the thread pool).
class CpuSelector {
 public:
  static constexpr int32_t kTileRows = 32;

  // num_threads <= 0 means one per hardware thread.
  explicit CpuSelector(int num_threads);

  KernelStatus Select(const SelectionShape& shape, const SelectionBatch& batch);

  // The page scorer Select uses for head_dim ("avx512" or "portable").
  static const char* isa(int32_t head_dim) { return BestPageScorer(head_dim).name; }
  int num_threads() const { return pool_.num_threads(); }

 private:
  struct Tile {
    const RowSpan* span;
    int32_t first_row_in_span;
    int32_t num_rows;
    int32_t num_blocks;    // visible blocks of the tile's last row
    int64_t score_offset;  // into block_scores_: [num_rows][H][num_blocks]
  };
  struct WorkItem {
    int32_t tile;
    int32_t first_block;
    int32_t end_block;
  };

  void ScoreItems(const PageScorer& scorer, const SelectionShape& shape,
                  const SelectionBatch& batch, const std::vector<Tile>& tiles,
                  const std::vector<WorkItem>& items);
  void SelectRows(const SelectionShape& shape, const SelectionBatch& batch,
                  const std::vector<Tile>& tiles);

  ThreadPool pool_;
  std::vector<float> widened_queries_;            // fp32 copy of the batch's queries
  std::vector<float> queries_;                    // the same in the page scorer's layout
  std::vector<float> block_scores_;               // per wave of tiles
  std::vector<std::vector<float>> page_scratch_;  // one per thread
};

}  // namespace blocksel::cpu

#endif  // BLOCKSEL_KERNELS_CPU_CPU_SELECTOR_H_
