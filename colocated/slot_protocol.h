// The slot protocol of the co-located data plane: which slot a request
// goes to, what its doorbell and completion words hold, how the server
// tells a valid doorbell from a bad one, and how an answer's status travels.
//
// Sequences: an attachment's requests are numbered 0, 1, 2, ... modulo 2^32
// (the words are 32 bits, so a GPU stream can wait on them); request s uses
// slot s % slot_count. A new region holds, in both words of slot i,
// InitialWord(i), the sequence slot_count before the slot's first request,
// answered (first_sequence 0; any start works the same). From then on, for the slot's last answered
// sequence a:
//   doorbell == a               the slot is idle
//   doorbell == a + slot_count  request a + slot_count is in the slot
//   anything else               a protocol violation
// The worker may fill slot s % slot_count once its completion word holds
// s - slot_count, and has its answer once the word holds s. Wrap-around
// needs no care: every comparison is equality modulo 2^32.
//
// The server never trusts the words it does not own: it keeps its own copy
// of each slot's last answered sequence (DoorbellScanner), so a worker that
// overwrites a completion word only confuses itself.
#ifndef BLOCKSEL_COLOCATED_SLOT_PROTOCOL_H_
#define BLOCKSEL_COLOCATED_SLOT_PROTOCOL_H_

#include <atomic>
#include <cstdint>
#include <optional>
#include <vector>

#include "absl/status/status.h"
#include "colocated/slot_region.h"

namespace blocksel::colocated {

// The other side (another process, or a GPU) writes a region's words
// concurrently: every access to them is atomic, on both sides. A load does
// not modify the word, so reading a const one is sound.
inline uint32_t LoadAcquire(const uint32_t& word) {
  return std::atomic_ref<uint32_t>(const_cast<uint32_t&>(word)).load(std::memory_order_acquire);
}
inline void StoreRelease(uint32_t& word, uint32_t value) {
  std::atomic_ref<uint32_t>(word).store(value, std::memory_order_release);
}

inline uint32_t SlotOf(uint32_t sequence, uint32_t slot_count) {
  return sequence & (slot_count - 1);
}
// What both words of slot `slot` hold in a new region whose first request
// is first_sequence: the sequence slot_count before the slot's first
// request (the first one from first_sequence on that maps to the slot).
inline uint32_t InitialWord(uint32_t slot, uint32_t slot_count, uint32_t first_sequence = 0) {
  return first_sequence + ((slot - first_sequence) & (slot_count - 1)) - slot_count;
}

// Puts every slot of a new region (controls[0, slot_count)) in its idle
// state: both words InitialWord, status OK, no message.
void InitializeControls(SlotControl* controls, uint32_t slot_count, uint32_t first_sequence = 0);

// The worker's side: hands out sequences in order. Not thread-safe: one
// sequencer per stream that issues selections.
class SlotSequencer {
 public:
  struct Request {
    uint32_t slot;
    uint32_t sequence;   // what the doorbell is rung with
    uint32_t free_when;  // the completion word that frees the slot for it
  };

  explicit SlotSequencer(uint32_t slot_count, uint32_t first_sequence = 0)
      : slot_count_(slot_count), next_(first_sequence) {}

  Request Next();

 private:
  uint32_t slot_count_;
  uint32_t next_;
};

// The server's side of one region: finds rung doorbells and hands them out
// in sequence order, each once, until Answered. Not thread-safe: one scanner
// per region, on the thread that polls it.
class DoorbellScanner {
 public:
  // A request to serve, or, with a violation, a doorbell to answer with that
  // error (the worker wrote a sequence the protocol does not allow).
  struct Rung {
    uint32_t slot;
    uint32_t sequence;
    absl::Status violation;
  };

  explicit DoorbellScanner(uint32_t slot_count, uint32_t first_sequence = 0);

  // Reads the doorbells of controls[0, slot_count) and returns what is new:
  // the rung requests from the next expected sequence on, in order, up to
  // the first that is not rung yet, and every violation. A request stays
  // handed out (and is not returned again) until Answered.
  std::vector<Rung> Scan(const SlotControl* controls);

  // The server wrote the answer of `sequence` into its slot: the slot is
  // idle again from the server's view.
  void Answered(uint32_t slot, uint32_t sequence);

 private:
  uint32_t slot_count_;
  uint32_t next_sequence_;          // the next request in order to hand out
  std::vector<uint32_t> answered_;  // per slot: its last answered sequence
  std::vector<bool> handed_out_;    // per slot: rung, handed out, not answered
  // Not OK once a violation was seen: the error every later doorbell gets.
  absl::Status broken_;
};

// Writes the answer to `sequence` into a slot's control block in host
// memory: status code and message first, then the completion word with
// release order, so a reader that sees the completion sees the status, and
// last the answer flag.
void WriteAnswer(SlotControl* control, uint32_t sequence, const absl::Status& status);

// The answer to `sequence`, once the slot's completion word holds it
// (acquire order); nullopt before. A message longer than kMessageBytes
// arrives cut.
std::optional<absl::Status> ReadAnswer(const SlotControl& control, uint32_t sequence);

}  // namespace blocksel::colocated

#endif  // BLOCKSEL_COLOCATED_SLOT_PROTOCOL_H_
