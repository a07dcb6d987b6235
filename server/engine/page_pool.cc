#include "server/engine/page_pool.h"

#include "absl/strings/str_cat.h"

namespace blocksel {

PagePool::PagePool(int64_t num_pages) : total_pages_(num_pages) {
  free_.reserve(num_pages);
  // Highest index at the bottom, so page 0 is handed out first.
  for (int64_t page = num_pages - 1; page >= 0; --page) {
    free_.push_back(static_cast<int32_t>(page));
  }
}

absl::Status PagePool::Allocate(int64_t count, std::vector<int32_t>* pages) {
  if (count > free_pages()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "key cache is full: ", count, " more pages needed, ", free_pages(), " of ", total_pages_,
        " free; release finished sequences or start the server with a larger "
        "--cache_mib"));
  }
  for (int64_t i = 0; i < count; ++i) {
    pages->push_back(free_.back());
    free_.pop_back();
  }
  return absl::OkStatus();
}

void PagePool::Free(absl::Span<const int32_t> pages) {
  for (auto it = pages.rbegin(); it != pages.rend(); ++it) free_.push_back(*it);
}

}  // namespace blocksel
