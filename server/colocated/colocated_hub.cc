#include "server/colocated/colocated_hub.h"

#include <unistd.h>

#include <cstddef>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "colocated/slot_request.h"

namespace blocksel {
namespace {

// Changes with every server process (slot_region.h's RegionHeader).
uint32_t NewEpoch() {
  return static_cast<uint32_t>(absl::ToUnixNanos(absl::Now())) ^
         (static_cast<uint32_t>(getpid()) << 16);
}

constexpr absl::Duration kLeaseCheckInterval = absl::Milliseconds(250);

}  // namespace

ColocatedHub::ColocatedHub(const ModelConfig& model, SelectBatcher* batcher,
                           std::unique_ptr<RegionDevice> device, std::string why_not,
                           ColocatedOptions options)
    : model_(model),
      batcher_(batcher),
      device_(std::move(device)),
      why_not_(std::move(why_not)),
      options_(std::move(options)),
      epoch_(NewEpoch()) {}

ColocatedHub::~ColocatedHub() {
  Shutdown();
  absl::MutexLock lock(&mutex_);
  // Slots still in flight belong to an engine that is gone.
  for (auto& [id, region] : regions_) FreeRegion(*region);
  regions_.clear();
}

void ColocatedHub::Shutdown() {
  {
    absl::MutexLock lock(&mutex_);
    if (stopping_) return;
    stopping_ = true;
  }
  if (poller_.joinable()) poller_.join();
  absl::MutexLock lock(&mutex_);
  std::vector<uint64_t> ids;
  for (auto& [id, region] : regions_) {
    Close(*region);
    ids.push_back(id);
  }
  for (uint64_t id : ids) FreeIfIdle(id);
}

int ColocatedHub::attachments() const {
  absl::MutexLock lock(&mutex_);
  return static_cast<int>(regions_.size());
}

absl::StatusOr<absl::Duration> ColocatedHub::LeaseOf(uint32_t seconds) const {
  if (seconds == 0) return options_.default_lease;
  const absl::Duration lease = absl::Seconds(seconds);
  if (lease > options_.max_lease) {
    return absl::InvalidArgumentError(
        absl::StrCat("lease_seconds ", seconds, " is above the server's maximum of ",
                     absl::ToInt64Seconds(options_.max_lease), "; renew the attachment instead"));
  }
  return lease;
}

absl::StatusOr<v1::AttachResponse> ColocatedHub::Attach(const v1::AttachRequest& request) {
  if (device_ == nullptr) return absl::FailedPreconditionError(why_not_);
  if (request.protocol_version() != colocated::kProtocolVersion) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the worker speaks co-located protocol ", request.protocol_version(), ", the server ",
        colocated::kProtocolVersion, "; use a client library of the server's version"));
  }
  if (!request.peer_access() &&
      !absl::EqualsIgnoreCase(request.pci_bus_id(), device_->pci_bus_id())) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the worker's GPU is ", request.pci_bus_id().empty() ? "unnamed" : request.pci_bus_id(),
        " and the server's is ", device_->pci_bus_id(),
        "; run the worker on the server's GPU, attach with peer_access from a GPU of the same "
        "host that reaches the server's, or use the gRPC data plane"));
  }
  if (request.max_requests() < 1) {
    return absl::InvalidArgumentError("max_requests must be >= 1");
  }
  if (request.tokens_per_request() < 1 ||
      request.tokens_per_request() > static_cast<uint32_t>(options_.max_tokens_per_request)) {
    return absl::InvalidArgumentError(absl::StrCat("tokens_per_request must be in [1, ",
                                                   options_.max_tokens_per_request, "], got ",
                                                   request.tokens_per_request()));
  }
  absl::StatusOr<absl::Duration> lease = LeaseOf(request.lease_seconds());
  if (!lease.ok()) return lease.status();
  const colocated::SlotModel slot_model{
      static_cast<uint32_t>(model_.num_heads), static_cast<uint32_t>(model_.head_dim),
      static_cast<uint32_t>(model_.TokenBytes()), static_cast<uint32_t>(model_.topk)};
  absl::StatusOr<colocated::RegionLayout> layout = colocated::RegionLayoutFor(
      colocated::SlotSizesFor(slot_model, request.slot_count(), request.max_requests(),
                              request.tokens_per_request(), request.with_keys()),
      options_.max_region_bytes);
  if (!layout.ok()) return layout.status();

  absl::MutexLock lock(&mutex_);
  if (stopping_) return absl::UnavailableError("the server is shutting down");
  if (static_cast<int>(regions_.size()) >= options_.max_attachments) {
    return absl::ResourceExhaustedError(absl::StrCat("the server has ", regions_.size(),
                                                     " attachments, its maximum; detach one ",
                                                     "or raise --colocated_max_attachments"));
  }
  auto region = std::make_unique<Region>();
  region->id = next_id_++;
  region->layout = *layout;
  region->max_requests = request.max_requests();
  region->tokens_per_request = request.tokens_per_request();
  region->lease = *lease;
  region->expires = options_.clock() + *lease;
  const std::string name = absl::StrCat("/blocksel-", getpid(), "-", epoch_, "-", region->id);
  absl::StatusOr<std::unique_ptr<colocated::SharedMemory>> host =
      colocated::SharedMemory::Create(name, layout->host_bytes);
  if (!host.ok()) return host.status();
  region->host = std::move(*host);
  auto* header = reinterpret_cast<colocated::RegionHeader*>(region->host->data());
  *header = colocated::RegionHeader{};
  header->sizes = layout->sizes;
  header->server_epoch = epoch_;
  colocated::InitializeControls(region->control(0), layout->sizes.slot_count);
  absl::StatusOr<void*> mapped = device_->MapHost(region->host->data(), layout->host_bytes);
  if (!mapped.ok()) return mapped.status();
  region->host_device = static_cast<unsigned char*>(*mapped);
  absl::StatusOr<RegionDevice::Buffer> payloads = device_->Allocate(layout->device_bytes);
  if (!payloads.ok()) {
    device_->UnmapHost(region->host->data());
    return payloads.status();
  }
  region->payloads = static_cast<unsigned char*>(payloads->address);
  region->scanner = std::make_unique<colocated::DoorbellScanner>(layout->sizes.slot_count);
  region->in_flight.resize(layout->sizes.slot_count);

  v1::AttachResponse response;
  response.set_attachment_id(region->id);
  response.set_shared_memory_name(name);
  response.set_ipc_handle(payloads->ipc_handle);
  response.set_slot_count(layout->sizes.slot_count);
  response.set_query_bytes(layout->sizes.query_bytes);
  response.set_key_bytes(layout->sizes.key_bytes);
  response.set_metadata_bytes(layout->sizes.metadata_bytes);
  response.set_ids_bytes(layout->sizes.ids_bytes);
  response.set_server_epoch(epoch_);
  response.set_lease_seconds(static_cast<uint32_t>(absl::ToInt64Seconds(*lease)));
  response.set_pci_bus_id(device_->pci_bus_id());
  regions_.emplace(region->id, std::move(region));
  return response;
}

absl::Status ColocatedHub::Renew(const v1::RenewAttachmentRequest& request) {
  absl::StatusOr<absl::Duration> lease = LeaseOf(request.lease_seconds());
  if (!lease.ok()) return lease.status();
  absl::MutexLock lock(&mutex_);
  auto it = regions_.find(request.attachment_id());
  if (it == regions_.end() || it->second->closed) {
    return absl::NotFoundError(absl::StrCat("attachment ", request.attachment_id(),
                                            " is not attached (detached, its lease ran out, or "
                                            "another server); attach again"));
  }
  it->second->lease = *lease;
  it->second->expires = options_.clock() + *lease;
  return absl::OkStatus();
}

absl::Status ColocatedHub::Detach(const v1::DetachRequest& request) {
  absl::MutexLock lock(&mutex_);
  auto it = regions_.find(request.attachment_id());
  if (it == regions_.end() || it->second->closed) {
    return absl::NotFoundError(absl::StrCat("attachment ", request.attachment_id(),
                                            " is not attached (detached, or its lease ran out)"));
  }
  Close(*it->second);
  FreeIfIdle(request.attachment_id());
  return absl::OkStatus();
}

int ColocatedHub::ReleaseExpired() {
  absl::MutexLock lock(&mutex_);
  const absl::Time now = options_.clock();
  std::vector<uint64_t> expired;
  for (auto& [id, region] : regions_) {
    if (!region->closed && region->expires < now) expired.push_back(id);
  }
  for (uint64_t id : expired) {
    Close(*regions_[id]);
    FreeIfIdle(id);
  }
  return static_cast<int>(expired.size());
}

void ColocatedHub::Close(Region& region) {
  region.closed = true;
  colocated::StoreRelease(reinterpret_cast<colocated::RegionHeader*>(region.host->data())->state,
                          colocated::kRegionClosed);
  // Ends every wait of the worker's streams, now and later.
  for (uint32_t slot = 0; slot < region.layout.sizes.slot_count; ++slot) {
    colocated::StoreRelease(region.control(slot)->answer_flag, 1);
  }
}

void ColocatedHub::FreeIfIdle(uint64_t id) {
  auto it = regions_.find(id);
  if (it == regions_.end() || !it->second->closed || it->second->pending > 0) return;
  FreeRegion(*it->second);
  regions_.erase(it);
}

void ColocatedHub::FreeRegion(Region& region) {
  device_->Free(region.payloads);
  device_->UnmapHost(region.host->data());
  region.host.reset();  // unmaps and unlinks; a worker's mapping stays valid
}

int ColocatedHub::PollOnce() {
  absl::MutexLock lock(&mutex_);
  int handled = 0;
  for (auto& [id, region] : regions_) {
    if (region->closed) continue;
    for (const colocated::DoorbellScanner::Rung& rung : region->scanner->Scan(region->control(0))) {
      Serve(*region, rung);
      ++handled;
    }
  }
  return handled;
}

void ColocatedHub::Serve(Region& region, const colocated::DoorbellScanner::Rung& rung) {
  if (!rung.violation.ok()) {
    AnswerFromHost(region, rung.slot, rung.sequence, rung.violation);
    return;
  }
  absl::StatusOr<std::unique_ptr<InFlight>> prepared = Prepare(region, rung.slot, rung.sequence);
  if (!prepared.ok()) {
    AnswerFromHost(region, rung.slot, rung.sequence, prepared.status());
    return;
  }
  InFlight* in_flight = prepared->get();
  region.in_flight[rung.slot] = std::move(*prepared);
  SelectTask task;
  task.request = &in_flight->request;
  task.device = &in_flight->payload;
  task.times = &in_flight->times;
  in_flight->times.received = absl::Now();
  in_flight->times.queued = in_flight->times.received;
  task.done = [this, id = region.id, slot = rung.slot, sequence = rung.sequence](
                  absl::Status status) { OnAnswered(id, slot, sequence, status); };
  const absl::Status queued = batcher_->Submit(std::move(task), nullptr);
  if (!queued.ok()) {
    region.in_flight[rung.slot].reset();
    AnswerFromHost(region, rung.slot, rung.sequence, queued);
    return;
  }
  ++region.pending;
}

absl::StatusOr<std::unique_ptr<ColocatedHub::InFlight>> ColocatedHub::Prepare(
    const Region& region, uint32_t slot, uint32_t sequence) const {
  // Copied out before it is checked: the worker may write the slot again.
  const unsigned char* metadata = region.host->data() + region.layout.MetadataOffset(slot);
  colocated::SlotBatchHeader header;
  std::memcpy(&header, metadata, sizeof(header));
  if (header.num_requests < 1 || header.num_requests > region.max_requests) {
    return absl::InvalidArgumentError(
        absl::StrCat("slot ", slot, ": num_requests ", header.num_requests, " is not in [1, ",
                     region.max_requests, "] (the attachment's max_requests); split the batch"));
  }
  if (header.tokens_per_request < 1 || header.tokens_per_request > region.tokens_per_request) {
    return absl::InvalidArgumentError(absl::StrCat(
        "slot ", slot, ": tokens_per_request ", header.tokens_per_request, " is not in [1, ",
        region.tokens_per_request, "] (the attachment's tokens_per_request)"));
  }
  if ((header.flags & ~colocated::kSlotCarriesKeys) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("slot ", slot, ": unknown flags ", header.flags,
                                                   "; the protocol knows 0 and ",
                                                   colocated::kSlotCarriesKeys, " (keys)"));
  }
  const bool with_keys = (header.flags & colocated::kSlotCarriesKeys) != 0;
  if (with_keys && region.layout.sizes.key_bytes == 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("slot ", slot,
                     ": the batch carries keys but the attachment has no room for them; "
                     "attach with with_keys"));
  }
  auto in_flight = std::make_unique<InFlight>();
  v1::SelectRequest& request = in_flight->request;
  request.set_request_id(header.request_id);
  request.set_layer(header.layer);
  request.set_query_dtype(v1::QUERY_DTYPE_BF16);
  request.set_layout(v1::BLOCK_ID_LAYOUT_HEAD_MAJOR);
  v1::DecodeBatch* batch = request.mutable_decode();
  batch->set_tokens_per_request(header.tokens_per_request);
  for (uint32_t i = 0; i < header.num_requests; ++i) {
    colocated::SlotDecodeRequest entry;
    std::memcpy(&entry, metadata + sizeof(header) + i * sizeof(entry), sizeof(entry));
    v1::DecodeRequest* decode = batch->add_requests();
    decode->set_sequence_id(entry.sequence_id);
    decode->set_seq_len(entry.seq_len);
  }
  const colocated::RegionLayout& layout = region.layout;
  unsigned char* payload = region.payloads + layout.PayloadOffset(slot);
  DevicePayload& device = in_flight->payload;
  device.queries = payload + layout.query_offset;
  device.query_bytes = layout.sizes.query_bytes;
  if (with_keys) {
    device.keys = payload + layout.key_offset;
    device.key_bytes = layout.sizes.key_bytes;
  }
  device.block_ids = reinterpret_cast<int32_t*>(payload + layout.ids_offset);
  device.ids_bytes = layout.sizes.ids_bytes;
  unsigned char* control = region.host_device + layout.ControlOffset(slot);
  device.status = reinterpret_cast<int32_t*>(control + offsetof(colocated::SlotControl, status));
  device.message_bytes =
      reinterpret_cast<uint32_t*>(control + offsetof(colocated::SlotControl, message_bytes));
  device.completion =
      reinterpret_cast<uint32_t*>(control + offsetof(colocated::SlotControl, completion));
  device.answer_flag =
      reinterpret_cast<uint32_t*>(control + offsetof(colocated::SlotControl, answer_flag));
  device.sequence = sequence;
  return in_flight;
}

void ColocatedHub::AnswerFromHost(Region& region, uint32_t slot, uint32_t sequence,
                                  const absl::Status& status) {
  colocated::WriteAnswer(region.control(slot), sequence, status);
  region.scanner->Answered(slot, sequence);
}

void ColocatedHub::OnAnswered(uint64_t id, uint32_t slot, uint32_t sequence,
                              const absl::Status& status) {
  absl::MutexLock lock(&mutex_);
  auto it = regions_.find(id);
  if (it == regions_.end()) return;
  Region& region = *it->second;
  --region.pending;
  if (status.ok() && options_.on_answered) options_.on_answered(region.in_flight[slot]->times);
  region.in_flight[slot].reset();
  if (status.ok()) {
    region.scanner->Answered(slot, sequence);  // the device wrote the answer
  } else {
    AnswerFromHost(region, slot, sequence, status);
  }
  FreeIfIdle(id);
}

void ColocatedHub::StartPolling() {
  poller_ = std::thread([this] { PollLoop(); });
}

void ColocatedHub::PollLoop() {
  absl::Time next_lease_check = absl::Now();
  while (true) {
    {
      absl::MutexLock lock(&mutex_);
      // Asleep while nobody is attached; Attach and Stop wake it.
      mutex_.Await(absl::Condition(this, &ColocatedHub::HasWorkOrStops));
      if (stopping_) return;
    }
    if (PollOnce() == 0) std::this_thread::yield();
    // Leases are checked by the thread that already runs while anyone is
    // attached.
    if (const absl::Time now = absl::Now(); now >= next_lease_check) {
      ReleaseExpired();
      next_lease_check = now + kLeaseCheckInterval;
    }
  }
}

}  // namespace blocksel
