// POSIX shared memory holding a region's host part (slot_region.h): the
// server creates it, the worker opens it by name. Both map it read-write;
// the creator unlinks the name when it goes, and the memory lives until
// the last mapping does.
#ifndef BLOCKSEL_COLOCATED_SHARED_MEMORY_H_
#define BLOCKSEL_COLOCATED_SHARED_MEMORY_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace blocksel::colocated {

class SharedMemory {
 public:
  // A new zeroed segment of `bytes` under `name` ("/name"); ALREADY_EXISTS
  // when the name is taken, INTERNAL (with the OS's reason) otherwise.
  static absl::StatusOr<std::unique_ptr<SharedMemory>> Create(const std::string& name,
                                                              int64_t bytes);
  // Maps the existing segment `name`, which must hold at least `bytes`:
  // NOT_FOUND when there is none (the server is gone or in another IPC
  // namespace), FAILED_PRECONDITION when it is smaller.
  static absl::StatusOr<std::unique_ptr<SharedMemory>> Open(const std::string& name, int64_t bytes);
  ~SharedMemory();
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;

  unsigned char* data() const { return data_; }
  int64_t bytes() const { return bytes_; }
  const std::string& name() const { return name_; }

 private:
  SharedMemory(std::string name, unsigned char* data, int64_t bytes, bool owner)
      : name_(std::move(name)), data_(data), bytes_(bytes), owner_(owner) {}

  std::string name_;
  unsigned char* data_;
  int64_t bytes_;
  bool owner_;  // unlinks the name when destroyed
};

}  // namespace blocksel::colocated

#endif  // BLOCKSEL_COLOCATED_SHARED_MEMORY_H_
