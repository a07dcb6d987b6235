// The GPU a co-located region lives on, as the hub needs it: device memory
// another process can map, and host memory its kernels can reach. Behind
// an interface so the hub's protocol handling is tested against host
// memory on machines without a GPU.
#ifndef BLOCKSEL_SERVER_COLOCATED_REGION_DEVICE_H_
#define BLOCKSEL_SERVER_COLOCATED_REGION_DEVICE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace blocksel {

class RegionDevice {
 public:
  // Waits queued on the device for words of mapped host memory, one at a
  // time: Watch makes the device wait until a word reaches a sequence
  // (WordCondition::kReaches), then calls the watch's callback on a runtime
  // thread, which must not call the device runtime. The host spends no core
  // on it meanwhile.
  class WordWatch {
   public:
    virtual ~WordWatch() = default;
    // Queues the next wait; FAILED_PRECONDITION while one is pending.
    // `word` is the device address of a word of mapped host memory.
    virtual absl::Status Watch(const uint32_t* word, uint32_t sequence) = 0;
    // Whether no wait is pending: the last one fired (or there was none).
    bool idle() const { return fired_.load(std::memory_order_acquire) == queued_; }

   protected:
    explicit WordWatch(std::function<void()> on_fired) : on_fired_(std::move(on_fired)) {}
    // For Watch: a wait is about to be queued (undone by Unqueued when
    // queueing fails).
    void Queued() { ++queued_; }
    void Unqueued() { --queued_; }
    // For the implementation's callback.
    void Fired() {
      fired_.fetch_add(1, std::memory_order_release);
      on_fired_();
    }

   private:
    const std::function<void()> on_fired_;
    uint64_t queued_ = 0;  // by the owner's thread only
    std::atomic<uint64_t> fired_{0};
  };

  struct Buffer {
    void* address = nullptr;  // device address
    std::string ipc_handle;   // what another process opens to map it
  };

  virtual ~RegionDevice() = default;
  // The device's PCI bus id, as a worker reports its own.
  virtual const std::string& pci_bus_id() const = 0;
  // Zeroed device memory another process on this host can map.
  virtual absl::StatusOr<Buffer> Allocate(int64_t bytes) = 0;
  virtual void Free(void* address) = 0;
  // The address kernels reach `bytes` of host memory at `host` under.
  virtual absl::StatusOr<void*> MapHost(void* host, int64_t bytes) = 0;
  virtual void UnmapHost(void* host) = 0;
  // A watch with its own queue of device work. Destroying it while a wait
  // is pending leaves the wait to the device: release the word first.
  virtual absl::StatusOr<std::unique_ptr<WordWatch>> CreateWordWatch(
      std::function<void()> on_fired) = 0;
};

// The GPU backend's device: FAILED_PRECONDITION in a build without GPU
// support or when the device cannot be used.
absl::StatusOr<std::unique_ptr<RegionDevice>> CreateGpuRegionDevice(int device);

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_COLOCATED_REGION_DEVICE_H_
