#include "colocated/shared_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace blocksel::colocated {
namespace {

std::string Reason() { return std::strerror(errno); }

absl::StatusOr<unsigned char*> Map(int fd, int64_t bytes, const std::string& name) {
  void* data = mmap(nullptr, static_cast<size_t>(bytes), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (data == MAP_FAILED) {
    return absl::InternalError(absl::StrCat("mapping shared memory ", name, ": ", Reason()));
  }
  return static_cast<unsigned char*>(data);
}

}  // namespace

absl::StatusOr<std::unique_ptr<SharedMemory>> SharedMemory::Create(const std::string& name,
                                                                   int64_t bytes) {
  const int fd = shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL, S_IRUSR | S_IWUSR);
  if (fd < 0) {
    const std::string message =
        absl::StrCat("creating shared memory ", name, ": ", Reason(),
                     errno == EACCES ? "; /dev/shm must be writable by the server" : "");
    return errno == EEXIST ? absl::AlreadyExistsError(message) : absl::InternalError(message);
  }
  absl::StatusOr<unsigned char*> data = absl::InternalError("not mapped");
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    data = absl::ResourceExhaustedError(absl::StrCat("sizing shared memory ", name, " to ", bytes,
                                                     " bytes: ", Reason(),
                                                     "; give /dev/shm more room"));
  } else {
    data = Map(fd, bytes, name);
  }
  close(fd);
  if (!data.ok()) {
    shm_unlink(name.c_str());
    return data.status();
  }
  return std::unique_ptr<SharedMemory>(new SharedMemory(name, *data, bytes, /*owner=*/true));
}

absl::StatusOr<std::unique_ptr<SharedMemory>> SharedMemory::Open(const std::string& name,
                                                                 int64_t bytes) {
  const int fd = shm_open(name.c_str(), O_RDWR, 0);
  if (fd < 0) {
    const std::string message = absl::StrCat(
        "opening shared memory ", name, ": ", Reason(),
        "; the worker must share the server's IPC namespace and /dev/shm (same host or pod)");
    return errno == ENOENT ? absl::NotFoundError(message) : absl::InternalError(message);
  }
  struct stat info {};
  if (fstat(fd, &info) != 0 || info.st_size < bytes) {
    close(fd);
    return absl::FailedPreconditionError(
        absl::StrCat("shared memory ", name, " holds ", static_cast<int64_t>(info.st_size),
                     " bytes, expected ", bytes, "; attach again"));
  }
  absl::StatusOr<unsigned char*> data = Map(fd, bytes, name);
  close(fd);
  if (!data.ok()) return data.status();
  return std::unique_ptr<SharedMemory>(new SharedMemory(name, *data, bytes, /*owner=*/false));
}

SharedMemory::~SharedMemory() {
  munmap(data_, static_cast<size_t>(bytes_));
  if (owner_) shm_unlink(name_.c_str());
}

}  // namespace blocksel::colocated
