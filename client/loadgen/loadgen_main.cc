// blocksel-loadgen: closed- or open-loop selection load against a running
// server, with every response checked.
//
// Each of --concurrency streams owns --batch sequences of --context tokens
// in the first sparse layer and sends batches over its own StreamSelect
// session: decode (Q = --query_tokens rows per request) or, for a
// 1 - --decode_fraction share, prefill chunks of --prefill_tokens rows.
// Keys and queries are small integers, so fp32 arithmetic is exact and the
// float64 reference must agree to the last block: every response gets the
// structural checks, and one in --oracle_every the full reference. The
// sequences are released at the end.
//
// Closed loop: each stream sends its next batch when the last one is
// answered. Open loop: batches are due at Poisson arrivals totalling
// --rate per second, and latency counts from when a batch was due, so a
// server that falls behind shows it (no coordinated omission).
//
// With --audit, against a server that audits layers reusing the first
// sparse layer's selection (--audit_layers), each stream also stores keys
// for those layers (the first layer's, one value in eight changed) and, in
// the closed loop, sends every decode batch again for each of them: its
// session answers those with the first layer's blocks (checked equal) and
// sends them to the server as audits. The report then gives the server's
// reuse overlap per layer distance over the measured window.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "client/blocksel_client.h"
#include "client/encoding.h"
#include "client/layer_groups.h"
#include "client/loadgen/metrics_scrape.h"
#include "client/loadgen/selection_checks.h"
#include "client/reference_selection.h"
#include "server/engine/select_times.h"

ABSL_FLAG(std::string, server, "localhost:50051", "Server address (host:port or unix:/path)");
ABSL_FLAG(std::string, mode, "closed", "closed or open");
ABSL_FLAG(int, concurrency, 4, "Streams (closed loop: batches in flight)");
ABSL_FLAG(double, rate, 100, "Open loop: batches per second over all streams");
ABSL_FLAG(double, duration_seconds, 10, "Measured time");
ABSL_FLAG(double, warmup_seconds, 2, "Unmeasured time before it");
ABSL_FLAG(uint32_t, lease_seconds, 600,
          "Lease of the sequences it opens, which it releases at the end; long enough to "
          "cover preparing every stream and the run");
ABSL_FLAG(int, batch, 8, "Requests (sequences) per batch");
ABSL_FLAG(int64_t, context, 32768, "Tokens of each sequence");
ABSL_FLAG(int, query_tokens, 1, "Decode: Q, query rows per request");
ABSL_FLAG(int, prefill_tokens, 512, "Prefill: rows per request (the chunk after context - this)");
ABSL_FLAG(double, decode_fraction, 1.0, "Share of batches that are decode; the rest prefill");
ABSL_FLAG(int, oracle_every, 100, "Check one response in this many against the reference");
ABSL_FLAG(std::string, metrics, "",
          "host:port of the server's metrics endpoint; reports its backend time per path");
ABSL_FLAG(bool, audit, false,
          "Also drive and report the server's reuse audit (closed loop, needs --metrics and a "
          "server whose --audit_layers reuse the first sparse layer)");
ABSL_FLAG(std::string, json_out, "", "Also write the results as JSON to this file");
ABSL_FLAG(uint64_t, seed, 1, "Seed of keys, queries and the batch mix");

namespace blocksel {
namespace {

// A small integer in [-3, 3] fixed by (a, b, c): keys and queries are
// regenerated from their coordinates for the reference instead of kept.
float SmallValue(uint64_t a, uint64_t b, uint64_t c) {
  uint64_t x = a * 0x9e3779b97f4a7c15ull ^ (b + 0x632be59bd9b4e019ull) * 0xbf58476d1ce4e5b9ull ^
               (c + 0x85ebca6b) * 0x94d049bb133111ebull;
  x ^= x >> 31;
  x *= 0xd6e8feb86659fd93ull;
  x ^= x >> 32;
  return static_cast<float>(static_cast<int64_t>(x % 7) - 3);
}

struct Settings {
  v1::ModelConfig model;
  SelectionShape shape;
  uint32_t layer = 0;
  int batch = 0;
  int64_t context = 0;
  int query_tokens = 0;
  int prefill_tokens = 0;
  double decode_fraction = 1;
  int oracle_every = 0;
  uint64_t seed = 0;
  uint32_t lease_seconds = 0;
  // Audited layers that reuse `layer`'s selection (with --audit).
  std::vector<uint32_t> audited_layers;
};

// Keys of sequence `global` (its index over all streams), [tokens][D].
std::vector<float> SequenceKeys(const Settings& s, uint64_t global, int64_t tokens) {
  std::vector<float> keys(static_cast<size_t>(tokens) * s.shape.head_dim);
  for (int64_t t = 0; t < tokens; ++t) {
    for (int32_t d = 0; d < s.shape.head_dim; ++d) {
      keys[t * s.shape.head_dim + d] = SmallValue(s.seed + global, t, d);
    }
  }
  return keys;
}

// Keys of sequence `global` in an audited layer: the first layer's with one
// value in eight replaced, so that the layers' selections mostly agree.
std::vector<float> AuditedLayerKeys(const Settings& s, uint64_t global, uint32_t layer,
                                    int64_t tokens) {
  std::vector<float> keys = SequenceKeys(s, global, tokens);
  for (size_t i = 0; i < keys.size(); ++i) {
    if (SmallValue(s.seed + layer, global, i) == 3) keys[i] = SmallValue(layer, global, i);
  }
  return keys;
}

// One batch to send and what checking its answer needs.
struct Batch {
  v1::SelectRequest request;
  std::vector<float> queries;         // decoded, [rows][H][D]
  std::vector<int64_t> positions;     // per row
  std::vector<ReferenceRows> rows;    // per request, keys unset
  std::vector<uint64_t> sequence_of;  // global sequence index per request
  bool decode = true;
};

class Stream {
 public:
  Stream(const Settings& settings, int index, BlockselClient* client)
      : s_(settings), index_(index), client_(client), random_(settings.seed * 1000 + index) {}

  // Opens the stream's sequences and appends their keys.
  absl::Status Prepare() {
    constexpr int64_t kChunk = 2048;
    for (int r = 0; r < s_.batch; ++r) {
      absl::StatusOr<uint64_t> id = client_->OpenSequence(0, s_.lease_seconds);
      if (!id.ok()) return id.status();
      ids_.push_back(*id);
      const uint64_t global = static_cast<uint64_t>(index_) * s_.batch + r;
      std::vector<std::pair<uint32_t, std::vector<float>>> layer_keys;
      layer_keys.emplace_back(s_.layer, SequenceKeys(s_, global, s_.context));
      for (const uint32_t layer : s_.audited_layers) {
        layer_keys.emplace_back(layer, AuditedLayerKeys(s_, global, layer, s_.context));
      }
      std::vector<v1::AppendKeysRequest> appends;
      for (const auto& [layer, keys] : layer_keys) {
        for (int64_t start = 0; start < s_.context; start += kChunk) {
          const int64_t tokens = std::min(kChunk, s_.context - start);
          v1::KeyAppend* append = appends.emplace_back().add_appends();
          append->set_sequence_id(*id);
          append->set_first_layer(layer);
          append->set_start_position(static_cast<uint64_t>(start));
          append->set_num_tokens(static_cast<uint32_t>(tokens));
          append->set_keys(
              EncodeKeys(absl::MakeConstSpan(keys.data() + start * s_.shape.head_dim,
                                             static_cast<size_t>(tokens) * s_.shape.head_dim),
                         s_.model.key_dtype()));
        }
      }
      absl::StatusOr<uint64_t> appended = client_->StreamAppendKeys(appends);
      if (!appended.ok()) return appended.status();
    }
    absl::StatusOr<std::unique_ptr<SelectSession>> session = client_->StartSelectSession();
    if (!session.ok()) return session.status();
    session_ = std::move(*session);
    return absl::OkStatus();
  }

  Batch NextBatch() {
    Batch batch;
    batch.decode = std::uniform_real_distribution<double>()(random_) < s_.decode_fraction;
    const int64_t rows_each = batch.decode ? s_.query_tokens : s_.prefill_tokens;
    v1::SelectRequest& request = batch.request;
    request.set_request_id(next_id_++);
    request.set_layer(s_.layer);
    if (batch.decode) request.mutable_decode()->set_tokens_per_request(s_.query_tokens);
    for (int r = 0; r < s_.batch; ++r) {
      const int64_t first = s_.context - rows_each;
      if (batch.decode) {
        v1::DecodeRequest* decode = request.mutable_decode()->add_requests();
        decode->set_sequence_id(ids_[r]);
        decode->set_seq_len(static_cast<uint64_t>(s_.context));
      } else {
        v1::PrefillRequest* prefill = request.mutable_prefill()->add_requests();
        prefill->set_sequence_id(ids_[r]);
        prefill->set_prefix_len(static_cast<uint64_t>(first));
        prefill->set_q_len(static_cast<uint32_t>(rows_each));
      }
      batch.rows.push_back({nullptr, first, static_cast<int32_t>(rows_each)});
      batch.sequence_of.push_back(static_cast<uint64_t>(index_) * s_.batch + r);
      for (int64_t i = 0; i < rows_each; ++i) batch.positions.push_back(first + i);
    }
    const int64_t values =
        static_cast<int64_t>(batch.positions.size()) * s_.shape.num_heads * s_.shape.head_dim;
    batch.queries.resize(values);
    for (int64_t v = 0; v < values; ++v) {
      batch.queries[v] = SmallValue(s_.seed ^ 0x51ed270b27ull, request.request_id() * 131 + index_,
                                    static_cast<uint64_t>(v));
    }
    request.set_queries(EncodeBf16(batch.queries));
    return batch;
  }

  absl::Status CheckStructure(const Batch& batch, const SelectResult& result) const {
    return CheckSelectionStructure(s_.shape, batch.positions, result);
  }

  // Against the float64 reference, exactly (the arithmetic is exact).
  absl::Status CheckReference(const Batch& batch, const SelectResult& result) const {
    int32_t first_row = 0;
    const int64_t row_values = int64_t{s_.shape.num_heads} * s_.shape.head_dim;
    for (size_t r = 0; r < batch.rows.size(); ++r) {
      const std::vector<float> keys = SequenceKeys(
          s_, batch.sequence_of[r], batch.rows[r].first_position + batch.rows[r].num_rows);
      ReferenceRows rows = batch.rows[r];
      rows.keys = keys.data();
      const std::vector<int32_t> expected =
          ReferenceSelect(s_.shape, {rows}, batch.queries.data() + first_row * row_values);
      for (int32_t head = 0; head < s_.shape.num_heads; ++head) {
        for (int32_t i = 0; i < rows.num_rows; ++i) {
          for (int32_t slot = 0; slot < s_.shape.topk; ++slot) {
            const int32_t want = expected[(head * rows.num_rows + i) * s_.shape.topk + slot];
            const int32_t got = result.at(head, first_row + i, slot);
            if (want != got) {
              return absl::FailedPreconditionError(
                  absl::StrCat("request ", r, " head ", head, " row ", i, " slot ", slot,
                               ": block ", got, ", the reference says ", want));
            }
          }
        }
      }
      first_row += rows.num_rows;
    }
    return absl::OkStatus();
  }

  // Releases the stream's sequences, so that their pages are free at once
  // rather than when their leases run out.
  absl::Status Release() {
    for (uint64_t id : ids_) {
      absl::StatusOr<bool> released = client_->ReleaseSequence(id);
      if (!released.ok()) return released.status();
      if (!*released) return absl::NotFoundError(absl::StrCat("sequence ", id, " was gone"));
    }
    ids_.clear();
    return absl::OkStatus();
  }

  SelectSession& session() { return *session_; }
  int index() const { return index_; }

 private:
  const Settings& s_;
  const int index_;
  BlockselClient* const client_;
  std::mt19937_64 random_;
  std::vector<uint64_t> ids_;
  std::unique_ptr<SelectSession> session_;
  uint64_t next_id_ = 1;
};

// What every stream records, merged at the end.
struct Tally {
  absl::Mutex mutex;
  std::vector<double> latency_us ABSL_GUARDED_BY(mutex);
  int64_t rows ABSL_GUARDED_BY(mutex) = 0;
  int64_t structure_checked ABSL_GUARDED_BY(mutex) = 0;
  int64_t oracle_checked ABSL_GUARDED_BY(mutex) = 0;
  int64_t errors ABSL_GUARDED_BY(mutex) = 0;
  std::string first_error ABSL_GUARDED_BY(mutex);
};

void CountError(Tally* tally, const Stream& stream, const absl::Status& status) {
  absl::MutexLock lock(&tally->mutex);
  if (tally->errors++ == 0) {
    tally->first_error = absl::StrCat("stream ", stream.index(), ": ", status.ToString());
  }
}

// Reference checks take far longer than a selection, so they run on their
// own thread, off the path that times answers; while kMaxWaiting are
// waiting, further ones are skipped rather than queued.
class ReferenceChecker {
 public:
  explicit ReferenceChecker(Tally* tally) : tally_(tally), worker_([this] { Work(); }) {}
  ~ReferenceChecker() {
    {
      absl::MutexLock lock(&mutex_);
      stopping_ = true;
    }
    worker_.join();
  }

  void Offer(const Stream* stream, Batch batch, SelectResult result) {
    absl::MutexLock lock(&mutex_);
    if (waiting_.size() >= kMaxWaiting) return;
    waiting_.push_back({stream, std::move(batch), std::move(result)});
  }

 private:
  static constexpr size_t kMaxWaiting = 4;
  struct Item {
    const Stream* stream;
    Batch batch;
    SelectResult result;
  };

  void Work() {
    for (;;) {
      Item item;
      {
        absl::MutexLock lock(&mutex_);
        auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mutex_) {
          return !waiting_.empty() || stopping_;
        };
        mutex_.Await(absl::Condition(&ready));
        if (waiting_.empty()) return;
        item = std::move(waiting_.front());
        waiting_.pop_front();
      }
      absl::Status status = item.stream->CheckReference(item.batch, item.result);
      if (!status.ok()) {
        CountError(tally_, *item.stream, status);
        continue;
      }
      absl::MutexLock lock(&tally_->mutex);
      ++tally_->oracle_checked;
    }
  }

  Tally* const tally_;
  absl::Mutex mutex_;
  std::deque<Item> waiting_ ABSL_GUARDED_BY(mutex_);
  bool stopping_ ABSL_GUARDED_BY(mutex_) = false;
  std::thread worker_;
};

struct Window {
  absl::Time measure_from;
  absl::Time end;
};

// Records one answer (its latency if it falls in the window), checks its
// structure, and offers one in oracle_every to the reference checker.
void Record(Stream& stream, Batch batch, absl::StatusOr<SelectResult> result, absl::Time due,
            absl::Time answered, const Window& window, int64_t count, int oracle_every,
            ReferenceChecker* checker, Tally* tally) {
  absl::Status status = result.status();
  if (status.ok()) status = stream.CheckStructure(batch, *result);
  if (!status.ok()) {
    CountError(tally, stream, status);
    return;
  }
  {
    absl::MutexLock lock(&tally->mutex);
    ++tally->structure_checked;
    if (due >= window.measure_from && answered <= window.end) {
      tally->latency_us.push_back(absl::ToDoubleMicroseconds(answered - due));
      tally->rows += static_cast<int64_t>(batch.positions.size());
    }
  }
  if (oracle_every > 0 && count % oracle_every == 0) {
    checker->Offer(&stream, std::move(batch), *std::move(result));
  }
}

// Sends a decode batch again for each audited layer: the session must
// answer each with the blocks of the batch's own answer.
absl::Status SendAudits(Stream& stream, const Batch& batch, const SelectResult& answer,
                        absl::Span<const uint32_t> audited_layers) {
  for (const uint32_t layer : audited_layers) {
    v1::SelectRequest request = batch.request;
    request.set_layer(layer);
    absl::StatusOr<SelectResult> reused = stream.session().Call(request);
    if (!reused.ok()) return reused.status();
    if (reused->block_ids != answer.block_ids) {
      return absl::InternalError(
          absl::StrCat("audited layer ", layer, " got other blocks than the layer it reuses"));
    }
  }
  return absl::OkStatus();
}

void RunClosed(Stream& stream, const Window& window, int oracle_every,
               absl::Span<const uint32_t> audited_layers, ReferenceChecker* checker, Tally* tally) {
  for (int64_t count = 0; absl::Now() < window.end; ++count) {
    Batch batch = stream.NextBatch();
    const absl::Time sent = absl::Now();
    absl::StatusOr<SelectResult> result = stream.session().Call(batch.request);
    const absl::Time answered = absl::Now();
    const bool broken = !result.ok() && absl::IsUnavailable(result.status());
    if (result.ok() && batch.decode) {
      // Outside the batch's latency; the server's audit work shows in the
      // next batch's, whose answer waits behind it.
      const absl::Status audited = SendAudits(stream, batch, *result, audited_layers);
      if (!audited.ok()) CountError(tally, stream, audited);
    }
    Record(stream, std::move(batch), std::move(result), sent, answered, window, count, oracle_every,
           checker, tally);
    if (broken) return;  // the stream broke
  }
}

// One sender and one receiver thread per stream; batches are due at Poisson
// arrivals of rate_per_stream.
void RunOpen(Stream& stream, const Window& window, double rate_per_stream, uint64_t seed,
             int oracle_every, ReferenceChecker* checker, Tally* tally) {
  struct Pending {
    Batch batch;
    absl::Time due;
  };
  absl::Mutex mutex;
  std::deque<Pending> pending;
  bool done_sending = false;
  std::thread receiver([&] {
    for (int64_t count = 0;; ++count) {
      Pending next;
      {
        absl::MutexLock lock(&mutex);
        auto ready = [&] { return !pending.empty() || done_sending; };
        mutex.Await(absl::Condition(&ready));
        if (pending.empty()) return;
        next = std::move(pending.front());
        pending.pop_front();
      }
      absl::StatusOr<SelectResult> result = stream.session().Receive();
      const bool broken = !result.ok() && absl::IsUnavailable(result.status());
      Record(stream, std::move(next.batch), std::move(result), next.due, absl::Now(), window, count,
             oracle_every, checker, tally);
      if (broken) return;
    }
  });
  std::mt19937_64 random(seed);
  std::exponential_distribution<double> gap(rate_per_stream);
  absl::Time due = absl::Now();
  while (true) {
    due += absl::Seconds(gap(random));
    if (due >= window.end) break;
    absl::SleepFor(due - absl::Now());
    Batch batch = stream.NextBatch();
    v1::SelectRequest request = batch.request;
    {
      absl::MutexLock lock(&mutex);
      pending.push_back({std::move(batch), due});
    }
    if (!stream.session().Send(request).ok()) break;
  }
  {
    absl::MutexLock lock(&mutex);
    done_sending = true;
  }
  receiver.join();
}

// The mean of one histogram series over the measured window.
struct SeriesMean {
  std::string name;
  double mean_us = 0;
  double count = 0;
};

// The means, between two scrapes, of the series named in `names`, in that
// order; series that did not move are left out.
std::vector<SeriesMean> MeansBetween(const HistogramTotals& before, const HistogramTotals& after,
                                     const std::vector<std::string>& names) {
  std::vector<SeriesMean> means;
  for (const std::string& name : names) {
    auto end = after.find(name);
    if (end == after.end()) continue;
    auto start = before.find(name);
    const SeriesTotals first = start == before.end() ? SeriesTotals{} : start->second;
    const double count = end->second.count - first.count;
    if (count <= 0) continue;
    means.push_back({name, (end->second.sum - first.sum) / count * 1e6, count});
  }
  return means;
}

// {"name": {"mean_us": .., "count": ..}, ...} plus `extra` members.
std::string MeansJson(const std::vector<SeriesMean>& means, const std::string& extra = "") {
  std::vector<std::string> members;
  for (const SeriesMean& mean : means) {
    members.push_back(absl::StrFormat("\"%s\": {\"mean_us\": %.2f, \"count\": %.0f}", mean.name,
                                      mean.mean_us, mean.count));
  }
  if (!extra.empty()) members.push_back(extra);
  return absl::StrCat("{", absl::StrJoin(members, ", "), "}");
}

// Prints the reuse audit between two scrapes, per layer distance with
// audits in between, and returns it as JSON: {"distance": {"mean_overlap":
// .., "rows": .., "compared": .., "skipped": ..}, ...}.
std::string AuditReport(const std::map<std::string, AuditTotals>& before,
                        const std::map<std::string, AuditTotals>& after) {
  std::vector<std::string> members;
  for (const auto& [distance, end] : after) {
    const auto start_it = before.find(distance);
    const AuditTotals start = start_it == before.end() ? AuditTotals{} : start_it->second;
    const double rows = end.overlap.count - start.overlap.count;
    const double mean = rows > 0 ? (end.overlap.sum - start.overlap.sum) / rows : 0;
    const double compared = end.compared - start.compared;
    const double skipped = end.skipped - start.skipped;
    if (compared + skipped <= 0) continue;
    std::printf(
        "reuse audit, layer distance %s: mean overlap %.4f over %.0f (head, row) pairs; %.0f "
        "sequence audits compared, %.0f skipped\n",
        distance.c_str(), mean, rows, compared, skipped);
    members.push_back(absl::StrFormat(
        "\"%s\": {\"mean_overlap\": %.4f, \"rows\": %.0f, \"compared\": %.0f, \"skipped\": %.0f}",
        distance, mean, rows, compared, skipped));
  }
  return absl::StrCat("{", absl::StrJoin(members, ", "), "}");
}

double Percentile(std::vector<double>& values, double q) {
  if (values.empty()) return 0;
  const size_t index = static_cast<size_t>(q * static_cast<double>(values.size() - 1));
  std::nth_element(values.begin(), values.begin() + index, values.end());
  return values[index];
}

int Run() {
  const std::string mode = absl::GetFlag(FLAGS_mode);
  if (mode != "closed" && mode != "open") {
    std::fprintf(stderr, "--mode must be closed or open\n");
    return 2;
  }
  BlockselClient client(absl::GetFlag(FLAGS_server));
  absl::StatusOr<v1::GetInfoResponse> info = client.GetInfo();
  if (!info.ok()) {
    std::fprintf(stderr, "GetInfo: %s\n", info.status().ToString().c_str());
    return 1;
  }
  Settings s;
  s.model = info->model();
  s.shape.num_heads = static_cast<int32_t>(s.model.num_heads());
  s.shape.head_dim = static_cast<int32_t>(s.model.head_dim());
  s.shape.topk = static_cast<int32_t>(s.model.topk());
  s.shape.init_blocks = static_cast<int32_t>(s.model.init_blocks());
  s.shape.local_blocks = static_cast<int32_t>(s.model.local_blocks());
  s.layer = s.model.first_sparse_layer();
  s.batch = absl::GetFlag(FLAGS_batch);
  s.context = absl::GetFlag(FLAGS_context);
  s.query_tokens = absl::GetFlag(FLAGS_query_tokens);
  s.prefill_tokens = absl::GetFlag(FLAGS_prefill_tokens);
  s.decode_fraction = absl::GetFlag(FLAGS_decode_fraction);
  s.oracle_every = absl::GetFlag(FLAGS_oracle_every);
  s.seed = absl::GetFlag(FLAGS_seed);
  s.lease_seconds = absl::GetFlag(FLAGS_lease_seconds);
  const int concurrency = absl::GetFlag(FLAGS_concurrency);
  const bool audit = absl::GetFlag(FLAGS_audit);
  if (audit) {
    const std::vector<int32_t> selecting = ReusingSelectingLayers(s.model);
    for (const uint32_t layer : s.model.audited_layers()) {
      if (SelectionSourceOf(selecting, layer) == s.layer) s.audited_layers.push_back(layer);
    }
    if (s.audited_layers.empty() || mode != "closed" || absl::GetFlag(FLAGS_metrics).empty()) {
      std::fprintf(stderr,
                   "--audit needs --mode=closed (got %s), --metrics (got '%s') and a server "
                   "that audits a layer reusing layer %u (its audited layers: %s); start it "
                   "with e.g. --select_every=4 --audit_layers=%u\n",
                   mode.c_str(), absl::GetFlag(FLAGS_metrics).c_str(), s.layer,
                   s.model.audited_layers().empty()
                       ? "none"
                       : absl::StrJoin(s.model.audited_layers(), ",").c_str(),
                   s.layer + 1);
      return 2;
    }
  }
  if (s.batch < 1 || concurrency < 1 || s.context < std::max(s.query_tokens, s.prefill_tokens)) {
    std::fprintf(stderr,
                 "need --batch >= 1, --concurrency >= 1 and a context of at least "
                 "--query_tokens and --prefill_tokens\n");
    return 2;
  }

  std::vector<std::unique_ptr<Stream>> streams;
  for (int i = 0; i < concurrency; ++i) {
    streams.push_back(std::make_unique<Stream>(s, i, &client));
    absl::Status prepared = streams.back()->Prepare();
    if (!prepared.ok()) {
      std::fprintf(stderr, "preparing stream %d: %s\n", i, prepared.ToString().c_str());
      return 1;
    }
  }

  const std::string metrics_target = absl::GetFlag(FLAGS_metrics);
  Window window;
  window.measure_from = absl::Now() + absl::Seconds(absl::GetFlag(FLAGS_warmup_seconds));
  window.end = window.measure_from + absl::Seconds(absl::GetFlag(FLAGS_duration_seconds));
  Tally tally;
  auto checker = std::make_unique<ReferenceChecker>(&tally);
  ServerTimes before;
  std::thread scraper;
  if (!metrics_target.empty()) {
    scraper = std::thread([&] {
      absl::SleepFor(window.measure_from - absl::Now());
      before = ScrapeServerTimes(metrics_target).value_or(ServerTimes{});
    });
  }
  std::vector<std::thread> threads;
  for (auto& stream : streams) {
    threads.emplace_back([&, stream = stream.get()] {
      if (mode == "closed") {
        RunClosed(*stream, window, s.oracle_every, s.audited_layers, checker.get(), &tally);
      } else {
        RunOpen(*stream, window, absl::GetFlag(FLAGS_rate) / concurrency,
                s.seed * 7919 + static_cast<uint64_t>(stream->index()), s.oracle_every,
                checker.get(), &tally);
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  ServerTimes after;
  if (scraper.joinable()) {
    scraper.join();
    after = ScrapeServerTimes(metrics_target).value_or(ServerTimes{});
  }
  for (auto& stream : streams) stream->session().Close().IgnoreError();
  checker.reset();  // finishes the reference checks already waiting
  for (auto& stream : streams) {
    absl::Status released = stream->Release();
    if (!released.ok()) CountError(&tally, *stream, released);
  }

  absl::MutexLock lock(&tally.mutex);
  const double seconds = absl::GetFlag(FLAGS_duration_seconds);
  std::vector<double>& latency = tally.latency_us;
  const double p50 = Percentile(latency, 0.5), p90 = Percentile(latency, 0.9),
               p99 = Percentile(latency, 0.99), max = Percentile(latency, 1.0);
  const std::string shape = absl::StrFormat(
      "B=%d context=%d Q=%d prefill T=%d decode share %.2f, H=%d D=%d topk=%d %s", s.batch,
      s.context, s.query_tokens, s.prefill_tokens, s.decode_fraction, s.shape.num_heads,
      s.shape.head_dim, s.shape.topk, v1::KeyDtype_Name(s.model.key_dtype()));
  std::printf("%s loop, %d streams, %s\n", mode.c_str(), concurrency, shape.c_str());
  std::printf(
      "| batches/s | rows/s | p50 | p90 | p99 | max | checked | reference-checked | errors |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|\n");
  std::printf("| %.0f | %.0f | %.0f us | %.0f us | %.0f us | %.0f us | %lld | %lld | %lld |\n",
              latency.size() / seconds, tally.rows / seconds, p50, p90, p99, max,
              static_cast<long long>(tally.structure_checked),
              static_cast<long long>(tally.oracle_checked), static_cast<long long>(tally.errors));
  double mean = 0;
  for (double value : latency) mean += value;
  if (!latency.empty()) mean /= static_cast<double>(latency.size());
  std::string backend_json = "{}";
  std::string stages_json = "{}";
  std::string audit_json = "{}";
  if (!metrics_target.empty()) {
    std::vector<std::string> paths;
    for (const auto& [path, totals] : after.backend) paths.push_back(path);
    const std::vector<SeriesMean> backend = MeansBetween(before.backend, after.backend, paths);
    for (const SeriesMean& path : backend) {
      std::printf("server backend time, %s: mean %.1f us over %.0f selections\n", path.name.c_str(),
                  path.mean_us, path.count);
    }
    backend_json = MeansJson(backend);
    // The server's stages of the answers in the window, and what is left
    // of the mean round trip: the client and the wire.
    const std::vector<SeriesMean> stages =
        MeansBetween(before.stages, after.stages,
                     std::vector<std::string>(kSelectStageNames.begin(), kSelectStageNames.end()));
    double server_us = 0;
    std::vector<std::string> terms;
    for (const SeriesMean& stage : stages) {
      server_us += stage.mean_us;
      terms.push_back(absl::StrFormat("%s %.1f", stage.name, stage.mean_us));
    }
    if (!stages.empty()) {
      std::printf("server stages, mean us: %s = %.1f\n", absl::StrJoin(terms, " + ").c_str(),
                  server_us);
      std::printf("round trip mean %.1f us = server %.1f + client and wire %.1f\n", mean, server_us,
                  mean - server_us);
    }
    stages_json =
        MeansJson(stages, absl::StrFormat("\"server_total_us\": %.2f, \"client_and_wire_us\": %.2f",
                                          server_us, mean - server_us));
    audit_json = AuditReport(before.audits, after.audits);
  }
  if (tally.errors > 0) std::printf("first error: %s\n", tally.first_error.c_str());
  const std::string json_path = absl::GetFlag(FLAGS_json_out);
  if (!json_path.empty()) {
    std::ofstream json(json_path);
    json << absl::StrFormat(
        "{\"mode\": \"%s\", \"streams\": %d, \"shape\": \"%s\", \"seconds\": %.1f, "
        "\"batches\": %d, \"batches_per_second\": %.1f, \"rows_per_second\": %.1f, "
        "\"latency_us\": {\"p50\": %.1f, \"p90\": %.1f, \"p99\": %.1f, \"max\": %.1f, "
        "\"mean\": %.1f}, \"checked\": %d, \"reference_checked\": %d, \"errors\": %d, "
        "\"backend\": %s, \"stages\": %s, \"reuse_audit\": %s}\n",
        mode, concurrency, shape, seconds, latency.size(), latency.size() / seconds,
        tally.rows / seconds, p50, p90, p99, max, mean, tally.structure_checked,
        tally.oracle_checked, tally.errors, backend_json, stages_json, audit_json);
  }
  return tally.errors == 0 && !latency.empty() ? 0 : 1;
}

}  // namespace
}  // namespace blocksel

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Closed- or open-loop selection load against a blocksel server; every response is "
      "checked");
  absl::ParseCommandLine(argc, argv);
  return blocksel::Run();
}
