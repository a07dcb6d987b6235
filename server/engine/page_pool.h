// Free-list of the physical pages of the key cache.
#ifndef BLOCKSEL_SERVER_ENGINE_PAGE_POOL_H_
#define BLOCKSEL_SERVER_ENGINE_PAGE_POOL_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace blocksel {

// Hands out page indices in [0, num_pages). Pages freed last are reused
// first, which keeps recently touched memory hot.
//
// Thread-compatible: the owner serializes calls.
class PagePool {
 public:
  explicit PagePool(int64_t num_pages);

  int64_t total_pages() const { return total_pages_; }
  int64_t free_pages() const { return static_cast<int64_t>(free_.size()); }

  // Appends count pages to *pages, or returns RESOURCE_EXHAUSTED and takes
  // none when fewer are free.
  absl::Status Allocate(int64_t count, std::vector<int32_t>* pages);

  // Returns pages to the pool. Each must have come from Allocate and not
  // been freed since.
  void Free(absl::Span<const int32_t> pages);

 private:
  int64_t total_pages_;
  std::vector<int32_t> free_;  // a stack: back() is handed out next
};

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_PAGE_POOL_H_
