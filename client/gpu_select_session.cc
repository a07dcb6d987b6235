#include "client/gpu_select_session.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "client/gpu_peer_access.h"
#include "colocated/slot_protocol.h"
#include "kernels/gpu/gpu_selection.h"

namespace blocksel {
namespace {

absl::Status DeviceError(absl::string_view what) {
  return absl::InternalError(absl::StrCat(what, ": ", gpu::LastErrorText()));
}

// Room a selection's part needs against what the slot has.
absl::Status CheckRoom(absl::string_view part, int64_t bytes, int64_t room) {
  if (bytes >= 0 && bytes <= room) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(part, " of ", bytes,
                                                 " bytes do not fit the slot's ", room,
                                                 "; attach with larger max_requests or "
                                                 "tokens_per_request"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<GpuSelectSession>> GpuSelectSession::Attach(
    BlockselClient* client, GpuSessionOptions options) {
  std::string bus_id;
  if (gpu::SetDevice(options.device) != KernelStatus::kOk ||
      gpu::PciBusId(options.device, &bus_id) != KernelStatus::kOk) {
    return absl::FailedPreconditionError(
        absl::StrCat("GPU ", options.device,
                     " cannot be used for a co-located session: ", gpu::LastErrorText()));
  }
  v1::AttachRequest request;
  request.set_pci_bus_id(bus_id);
  request.set_protocol_version(colocated::kProtocolVersion);
  request.set_slot_count(options.slot_count);
  request.set_max_requests(options.max_requests);
  request.set_tokens_per_request(options.tokens_per_request);
  request.set_with_keys(options.with_keys);
  request.set_lease_seconds(options.lease_seconds);
  request.set_peer_access(options.peer_access);
  absl::StatusOr<v1::AttachResponse> attached = client->Attach(request);
  if (!attached.ok()) return attached.status();

  // From here the destructor undoes whatever was set up.
  std::unique_ptr<GpuSelectSession> session(new GpuSelectSession());
  session->client_ = client;
  session->options_ = options;
  session->attachment_id_ = attached->attachment_id();
  session->lease_seconds_ = attached->lease_seconds();
  // Another GPU of the host: its memory must be reachable from ours.
  if (!attached->pci_bus_id().empty()) {
    absl::Status reachable = CheckPeerAccess(options.device, attached->pci_bus_id());
    if (!reachable.ok()) return reachable;
  }
  colocated::RegionSizes sizes;
  sizes.slot_count = attached->slot_count();
  sizes.query_bytes = attached->query_bytes();
  sizes.key_bytes = attached->key_bytes();
  sizes.metadata_bytes = attached->metadata_bytes();
  sizes.ids_bytes = attached->ids_bytes();
  absl::StatusOr<colocated::RegionLayout> layout =
      colocated::RegionLayoutFor(sizes, std::numeric_limits<int64_t>::max());
  if (!layout.ok()) return layout.status();
  session->layout_ = *layout;
  absl::StatusOr<std::unique_ptr<colocated::SharedMemory>> host =
      colocated::SharedMemory::Open(attached->shared_memory_name(), layout->host_bytes);
  if (!host.ok()) return host.status();
  session->host_ = std::move(*host);
  const auto* header = reinterpret_cast<const colocated::RegionHeader*>(session->host_->data());
  if (header->magic != colocated::kRegionMagic || header->version != colocated::kProtocolVersion ||
      header->server_epoch != attached->server_epoch()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "shared memory ", attached->shared_memory_name(),
        " is not the region the server described (magic, version or epoch differ); attach again"));
  }
  void* mapped = nullptr;
  if (gpu::HostRegister(session->host_->data(), layout->host_bytes, &mapped) != KernelStatus::kOk) {
    return DeviceError("registering the region's shared memory with the GPU");
  }
  session->host_device_ = static_cast<unsigned char*>(mapped);
  void* payloads = nullptr;
  if (gpu::IpcOpen(attached->ipc_handle(), &payloads) != KernelStatus::kOk) {
    return absl::FailedPreconditionError(
        absl::StrCat("mapping the server's GPU memory: ", gpu::LastErrorText(),
                     "; the worker must share the server's GPU and IPC namespace"));
  }
  session->payloads_ = static_cast<unsigned char*>(payloads);
  void* words = nullptr;
  void* words_device = nullptr;
  if (gpu::PinnedAlloc(&words, sizeof(gpu::SessionWords)) != KernelStatus::kOk) {
    return DeviceError("allocating the session's words");
  }
  session->words_ = new (words) gpu::SessionWords();
  if (gpu::DevicePointerOf(words, &words_device) != KernelStatus::kOk) {
    return DeviceError("mapping the session's words");
  }
  session->words_device_ = static_cast<gpu::SessionWords*>(words_device);
  void* scratch = nullptr;
  void* sequences = nullptr;
  if (gpu::DeviceAlloc(&scratch, 2 * sizeof(uint32_t)) != KernelStatus::kOk ||
      gpu::DeviceAlloc(&sequences, int64_t{2} * sizes.slot_count * sizeof(uint32_t)) !=
          KernelStatus::kOk) {
    return DeviceError("allocating the session's device words");
  }
  session->scratch_ = static_cast<uint32_t*>(scratch);
  session->sequences_ = static_cast<uint32_t*>(sequences);
  // Slot i posts and awaits sequences i, i + slot_count, ...
  std::vector<uint32_t> first(2 * sizes.slot_count);
  for (uint32_t i = 0; i < 2 * sizes.slot_count; ++i) first[i] = i % sizes.slot_count;
  if (gpu::ZeroDevice(scratch, 2 * sizeof(uint32_t), nullptr) != KernelStatus::kOk ||
      gpu::CopyHostToDevice(sequences, first.data(), static_cast<int64_t>(first.size() * 4),
                            nullptr) != KernelStatus::kOk ||
      gpu::StreamSynchronize(nullptr) != KernelStatus::kOk) {
    return DeviceError("initializing the session's device words");
  }

  gpu::SlotRing& ring = session->ring_;
  ring.slot_count = sizes.slot_count;
  ring.controls = session->host_device_ + layout->controls_offset;
  ring.control_stride = sizeof(colocated::SlotControl);
  ring.doorbell_offset = offsetof(colocated::SlotControl, doorbell);
  ring.answer_flag_offset = offsetof(colocated::SlotControl, answer_flag);
  ring.completion_offset = offsetof(colocated::SlotControl, completion);
  ring.status_offset = offsetof(colocated::SlotControl, status);
  ring.metadata = session->host_device_ + layout->metadata_offset;
  ring.metadata_stride = layout->metadata_stride;
  ring.region_state = reinterpret_cast<const uint32_t*>(session->host_device_ +
                                                        offsetof(colocated::RegionHeader, state));
  ring.serving_state = colocated::kRegionServing;
  ring.payloads = session->payloads_;
  ring.slot_stride = layout->slot_stride;
  session->timeout_ticks_ =
      static_cast<int64_t>(absl::ToDoubleSeconds(options.wait_timeout) *
                           static_cast<double>(gpu::TicksPerSecond(options.device)));
  session->watchdog_ = std::thread([raw = session.get()] { raw->WatchLoop(); });
  return session;
}

GpuSelectSession::~GpuSelectSession() {
  {
    absl::MutexLock lock(&mutex_);
    stopping_ = true;
  }
  if (watchdog_.joinable()) watchdog_.join();
  gpu::DeviceFree(scratch_);
  gpu::DeviceFree(sequences_);
  if (words_ != nullptr) gpu::PinnedFree(words_);
  gpu::IpcClose(payloads_);
  if (host_device_ != nullptr) gpu::HostUnregister(host_->data());
  host_.reset();
  // After the mappings are gone, so the server frees memory nobody maps.
  if (attachment_id_ != 0) client_->Detach(attachment_id_).IgnoreError();
}

void GpuSelectSession::WatchLoop() {
  // Renewals often enough that a lost attachment is noticed within a
  // second, and well inside any lease; stalls checked between them.
  const absl::Duration renew_every = std::min(absl::Seconds(1), absl::Seconds(lease_seconds_) / 3);
  constexpr absl::Duration kTick = absl::Milliseconds(50);
  absl::Time next_renewal = absl::Now() + renew_every;
  absl::Time last_progress = absl::Now();
  std::vector<uint32_t> seen;
  absl::MutexLock lock(&mutex_);
  while (!stopping_) {
    mutex_.AwaitWithTimeout(absl::Condition(&stopping_), kTick);
    if (stopping_) return;
    const absl::Time now = absl::Now();
    bool moved = false;
    if (!Pending(&seen, &moved) || moved) last_progress = now;
    if (colocated::LoadAcquire(words_->failure) !=
        static_cast<uint32_t>(gpu::SessionFailure::kNone)) {
      // A post gave up: the await paired with it would wait for nothing.
      CloseLocally(absl::DeadlineExceededError(absl::StrCat(
          "a slot stayed busy longer than ", absl::FormatDuration(options_.wait_timeout),
          " or the region closed; attach again")));
      return;
    }
    if (now - last_progress > options_.wait_timeout) {
      CloseLocally(absl::DeadlineExceededError(
          absl::StrCat("no answer within ", absl::FormatDuration(options_.wait_timeout),
                       "; the server may have died or hung: attach again")));
      return;
    }
    if (now < next_renewal) continue;
    next_renewal = now + renew_every;
    mutex_.Unlock();
    const absl::Status renewed = client_->RenewAttachment(attachment_id_, lease_seconds_);
    mutex_.Lock();
    if (!renewed.ok() && !stopping_) {
      CloseLocally(absl::UnavailableError(absl::StrCat("attachment ", attachment_id_, " is gone (",
                                                       renewed.message(), "); attach again")));
      return;
    }
  }
}

bool GpuSelectSession::Pending(std::vector<uint32_t>* seen, bool* moved) const {
  const uint32_t slots = layout_.sizes.slot_count;
  seen->resize(slots);
  bool pending = false;
  for (uint32_t slot = 0; slot < slots; ++slot) {
    const auto* control = reinterpret_cast<const colocated::SlotControl*>(
        host_->data() + layout_.ControlOffset(slot));
    const uint32_t completion = colocated::LoadAcquire(control->completion);
    pending = pending || colocated::LoadAcquire(control->doorbell) != completion;
    *moved = *moved || (*seen)[slot] != completion;
    (*seen)[slot] = completion;
  }
  return pending;
}

void GpuSelectSession::CloseLocally(absl::Status why) {
  gone_ = std::move(why);
  auto* header = reinterpret_cast<colocated::RegionHeader*>(host_->data());
  colocated::StoreRelease(header->state, colocated::kRegionClosed);
  for (uint32_t slot = 0; slot < layout_.sizes.slot_count; ++slot) {
    auto* control =
        reinterpret_cast<colocated::SlotControl*>(host_->data() + layout_.ControlOffset(slot));
    colocated::StoreRelease(control->answer_flag, 1);
  }
}

absl::Status GpuSelectSession::Post(const Selection& selection, void* stream) {
  {
    absl::MutexLock lock(&mutex_);
    if (!gone_.ok()) return gone_;
  }
  const colocated::RegionSizes& sizes = layout_.sizes;
  if (selection.batch == nullptr || selection.queries == nullptr) {
    return absl::InvalidArgumentError("a selection needs its batch and its queries");
  }
  if (absl::Status room = CheckRoom("the batch", selection.batch_bytes, sizes.metadata_bytes);
      !room.ok()) {
    return room;
  }
  if (absl::Status room = CheckRoom("queries", selection.query_bytes, sizes.query_bytes);
      !room.ok()) {
    return room;
  }
  if (absl::Status room =
          CheckRoom("keys", selection.keys == nullptr ? 0 : selection.key_bytes, sizes.key_bytes);
      !room.ok()) {
    return room;
  }
  gpu::PostedRequest request;
  request.queries = selection.queries;
  request.query_bytes = selection.query_bytes;
  request.query_offset = layout_.query_offset;
  request.keys = selection.keys;
  request.key_bytes = selection.key_bytes;
  request.key_offset = layout_.key_offset;
  request.metadata = selection.batch;
  request.metadata_bytes = selection.batch_bytes;
  if (gpu::LaunchPostRequest(ring_, request, next_post_slot_, sequences_, words_device_, scratch_,
                             timeout_ticks_, stream) != KernelStatus::kOk) {
    return DeviceError("enqueueing a co-located post");
  }
  next_post_slot_ = (next_post_slot_ + 1) % layout_.sizes.slot_count;
  return absl::OkStatus();
}

absl::Status GpuSelectSession::Await(int32_t* block_ids, int64_t ids_bytes, void* stream) {
  if (absl::Status room = CheckRoom("block ids", ids_bytes, layout_.sizes.ids_bytes); !room.ok()) {
    return room;
  }
  if (gpu::LaunchAwaitAnswer(ring_, next_await_slot_, layout_.ids_offset, ids_bytes, block_ids,
                             sequences_, words_device_, stream) != KernelStatus::kOk) {
    return DeviceError("enqueueing a co-located wait");
  }
  next_await_slot_ = (next_await_slot_ + 1) % layout_.sizes.slot_count;
  return absl::OkStatus();
}

absl::Status GpuSelectSession::Select(const Selection& selection, void* stream) {
  if (absl::Status posted = Post(selection, stream); !posted.ok()) return posted;
  return Await(selection.block_ids, selection.ids_bytes, stream);
}

absl::Status GpuSelectSession::LastStatus() const {
  switch (static_cast<gpu::SessionFailure>(colocated::LoadAcquire(words_->failure))) {
    case gpu::SessionFailure::kNone:
      break;
    case gpu::SessionFailure::kRegionClosed: {
      absl::MutexLock lock(&mutex_);
      if (!gone_.ok()) return gone_;
      return absl::UnavailableError(
          "the server closed the attachment (detached, its lease ran out, or the server shut "
          "down); attach again");
    }
    case gpu::SessionFailure::kTimedOut:
      return absl::DeadlineExceededError(absl::StrCat("a slot stayed busy longer than ",
                                                      absl::FormatDuration(options_.wait_timeout),
                                                      "; attach again"));
  }
  const uint32_t sequence = colocated::LoadAcquire(words_->last_sequence);
  const auto* control = reinterpret_cast<const colocated::SlotControl*>(
      host_->data() + layout_.ControlOffset(colocated::SlotOf(sequence, layout_.sizes.slot_count)));
  const std::optional<absl::Status> answer = colocated::ReadAnswer(*control, sequence);
  if (!answer.has_value()) {
    return absl::FailedPreconditionError("no selection has been awaited yet");
  }
  return *answer;
}

}  // namespace blocksel
