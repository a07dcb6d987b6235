#include "colocated/slot_protocol.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace blocksel::colocated {

void InitializeControls(SlotControl* controls, uint32_t slot_count, uint32_t first_sequence) {
  for (uint32_t slot = 0; slot < slot_count; ++slot) {
    controls[slot] = SlotControl{};
    controls[slot].doorbell = InitialWord(slot, slot_count, first_sequence);
    controls[slot].completion = InitialWord(slot, slot_count, first_sequence);
  }
}

SlotSequencer::Request SlotSequencer::Next() {
  const uint32_t sequence = next_++;
  return {SlotOf(sequence, slot_count_), sequence, sequence - slot_count_};
}

DoorbellScanner::DoorbellScanner(uint32_t slot_count, uint32_t first_sequence)
    : slot_count_(slot_count),
      next_sequence_(first_sequence),
      answered_(slot_count),
      handed_out_(slot_count, false) {
  for (uint32_t i = 0; i < slot_count; ++i)
    answered_[i] = InitialWord(i, slot_count, first_sequence);
}

std::vector<DoorbellScanner::Rung> DoorbellScanner::Scan(const SlotControl* controls) {
  std::vector<Rung> found;
  // Violations first: a slot not in flight whose doorbell is neither idle
  // nor its next request. Once one is seen the attachment is broken: from
  // then on every doorbell change is answered with an error, so no wait of
  // the worker's hangs.
  for (uint32_t slot = 0; slot < slot_count_; ++slot) {
    if (handed_out_[slot]) continue;
    const uint32_t doorbell = LoadAcquire(controls[slot].doorbell);
    const uint32_t answered = answered_[slot];
    if (doorbell == answered) continue;
    if (broken_.ok() && doorbell == answered + slot_count_) continue;  // rung: handed out below
    if (broken_.ok()) {
      broken_ = absl::FailedPreconditionError(absl::StrCat(
          "slot ", slot, " was rung with sequence ", doorbell, " where ", answered + slot_count_,
          " (its next request) or ", answered,
          " (none) was allowed; this attachment serves no more requests: detach and attach "
          "again"));
      found.push_back({slot, doorbell,
                       absl::InvalidArgumentError(absl::StrCat(
                           "slot ", slot, " doorbell holds sequence ", doorbell, ", expected ",
                           answered + slot_count_, " (the slot's next request) or ", answered,
                           " (no request); ring each slot with the sequence SlotSequencer "
                           "gives"))});
    } else {
      found.push_back({slot, doorbell, broken_});
    }
    handed_out_[slot] = true;
  }
  if (!broken_.ok()) return found;
  // Requests in order: the next sequence's slot must hold exactly it.
  while (true) {
    const uint32_t slot = SlotOf(next_sequence_, slot_count_);
    if (handed_out_[slot] || answered_[slot] + slot_count_ != next_sequence_ ||
        LoadAcquire(controls[slot].doorbell) != next_sequence_) {
      break;
    }
    found.push_back({slot, next_sequence_, absl::OkStatus()});
    handed_out_[slot] = true;
    ++next_sequence_;
  }
  return found;
}

void DoorbellScanner::Answered(uint32_t slot, uint32_t sequence) {
  answered_[slot] = sequence;
  handed_out_[slot] = false;
}

void WriteAnswer(SlotControl* control, uint32_t sequence, const absl::Status& status) {
  const absl::string_view message = status.message();
  const size_t bytes = std::min(message.size(), sizeof(control->message));
  // An OK status's message may have no storage at all (a null data()).
  if (bytes > 0) std::memcpy(control->message, message.data(), bytes);
  control->message_bytes = static_cast<uint32_t>(bytes);
  control->status = static_cast<int32_t>(status.code());
  StoreRelease(control->completion, sequence);
  StoreRelease(control->answer_flag, 1);
}

std::optional<absl::Status> ReadAnswer(const SlotControl& control, uint32_t sequence) {
  if (LoadAcquire(control.completion) != sequence) return std::nullopt;
  const uint32_t bytes =
      std::min(control.message_bytes, static_cast<uint32_t>(sizeof(control.message)));
  return absl::Status(static_cast<absl::StatusCode>(control.status),
                      absl::string_view(control.message, bytes));
}

}  // namespace blocksel::colocated
