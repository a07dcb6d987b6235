// The gRPC service end to end in one process: every RPC, its results and
// its statuses.
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "blocksel/v1/block_selector.grpc.pb.h"
#include "client/blocksel_client.h"
#include "client/encoding.h"
#include "client/loadgen/metrics_scrape.h"
#include "client/reference_selection.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/slice.h"
#include "grpcpp/support/stub_options.h"
#include "gtest/gtest.h"
#include "server/blocksel_server.h"
#include "server/engine/select_times.h"
#include "tests/support/test_model.h"
#include "tests/transport/service_test_fixture.h"

namespace blocksel {
namespace {

using testing::GrpcServiceTest;
using testing::kFirstSparseLayer;
using testing::kWaitLimit;
using Encoded = testing::EncodedBf16;
using testing::kMaxMessageBytes;
using testing::kPages;

TEST_F(GrpcServiceTest, GetInfoDescribesTheServer) {
  absl::StatusOr<v1::GetInfoResponse> info = Info();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->model().num_layers(), 4u);
  EXPECT_EQ(info->model().first_sparse_layer(), 1u);
  EXPECT_EQ(info->model().num_heads(), 2u);
  EXPECT_EQ(info->model().head_dim(), 32u);
  EXPECT_EQ(info->model().key_dtype(), v1::KEY_DTYPE_BF16);
  EXPECT_EQ(info->model().topk(), 4u);
  EXPECT_EQ(info->model().block_size(), 128u);
  EXPECT_EQ(info->model().max_positions(), 4096u);
  EXPECT_EQ(info->cache().total_pages(), static_cast<uint64_t>(kPages));
  EXPECT_EQ(info->cache().free_pages(), static_cast<uint64_t>(kPages));
  EXPECT_EQ(info->cache().page_bytes(), static_cast<uint64_t>(model_.PageBytes()));
  EXPECT_EQ(info->cache().open_sequences(), 0u);
  EXPECT_EQ(info->backend(), "cpu");
  EXPECT_FALSE(info->server_version().empty());
  EXPECT_EQ(info->default_lease_seconds(), 600u);
  EXPECT_EQ(info->max_message_bytes(), static_cast<uint64_t>(kMaxMessageBytes));
}

TEST_F(GrpcServiceTest, SequenceLifecycle) {
  const uint64_t chosen = Open();
  EXPECT_NE(chosen, 0u);
  EXPECT_EQ(Open(500), 500u);
  EXPECT_EQ(client_->OpenSequence(500).status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(client_->OpenSequence(501, /*lease_seconds=*/7200).status().code(),
            absl::StatusCode::kInvalidArgument);

  const uint64_t both[] = {chosen, 500};
  EXPECT_TRUE(client_->RenewLease(both).ok());
  const uint64_t with_unknown[] = {chosen, 999};
  EXPECT_EQ(client_->RenewLease(with_unknown).code(), absl::StatusCode::kNotFound);

  absl::StatusOr<v1::GetInfoResponse> info = Info();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->cache().open_sequences(), 2u);

  absl::StatusOr<bool> released = client_->ReleaseSequence(500);
  ASSERT_TRUE(released.ok()) << released.status();
  EXPECT_TRUE(*released);
  released = client_->ReleaseSequence(500);
  ASSERT_TRUE(released.ok()) << released.status();
  EXPECT_FALSE(*released) << "releasing twice is fine and says so";
  EXPECT_EQ(client_->RenewLease(absl::MakeConstSpan(both, 2)).code(), absl::StatusCode::kNotFound);
}

// A sequence left untouched for its lease is released by the server's
// periodic reaper and its pages are reused; a sequence in use is kept.
TEST_F(GrpcServiceTest, ExpiredLeasesAreReleasedAndTheirPagesReused) {
  absl::StatusOr<uint64_t> idle = client_->OpenSequence(0, /*lease_seconds=*/1);
  absl::StatusOr<uint64_t> busy = client_->OpenSequence(0, /*lease_seconds=*/1);
  ASSERT_TRUE(idle.ok() && busy.ok());
  Encoded keys;
  v1::AppendKeysRequest request;
  *request.add_appends() = MakeAppend(*idle, 1, 0, 300, &keys);
  *request.add_appends() = MakeAppend(*busy, 1, 0, 10, &keys);
  ASSERT_TRUE(client_->AppendKeys(request).ok());
  EXPECT_EQ(FreePages(), kPages - 4);
  // Renew `busy` every 250 ms; `idle` expires after 1 s untouched and the
  // reaper (every second) frees its 3 pages.
  const absl::Time give_up = absl::Now() + kWaitLimit;
  while (FreePages() != kPages - 1 && absl::Now() < give_up) {
    const uint64_t renew[] = {*busy};
    ASSERT_TRUE(client_->RenewLease(renew).ok());
    absl::SleepFor(absl::Milliseconds(250));
  }
  EXPECT_EQ(FreePages(), kPages - 1);
  const uint64_t idle_only[] = {*idle};
  EXPECT_EQ(client_->RenewLease(idle_only).code(), absl::StatusCode::kNotFound);
  const uint64_t busy_only[] = {*busy};
  EXPECT_TRUE(client_->RenewLease(busy_only).ok());
  // The freed pages serve a new sequence.
  const uint64_t fresh = Open();
  v1::AppendKeysRequest reuse;
  *reuse.add_appends() = MakeAppend(fresh, 1, 0, 300, &keys);
  EXPECT_TRUE(client_->AppendKeys(reuse).ok());
  EXPECT_EQ(FreePages(), kPages - 4);
}

TEST_F(GrpcServiceTest, AppendKeysAndItsErrors) {
  const uint64_t id = Open();
  Encoded keys;
  v1::AppendKeysRequest two_layers;
  v1::KeyAppend* append = two_layers.add_appends();
  *append = MakeAppend(id, 2, 0, 2 * 150, &keys);  // bytes for 2 x 150 tokens
  append->set_num_layers(2);
  append->set_num_tokens(150);
  absl::StatusOr<uint64_t> appended = client_->AppendKeys(two_layers);
  ASSERT_TRUE(appended.ok()) << appended.status();
  EXPECT_EQ(*appended, 300u);
  EXPECT_EQ(FreePages(), kPages - 2);

  v1::AppendKeysRequest dense;
  *dense.add_appends() = MakeAppend(id, 0, 0, 4, &keys);
  EXPECT_EQ(client_->AppendKeys(dense).status().code(), absl::StatusCode::kInvalidArgument);
  v1::AppendKeysRequest unknown;
  *unknown.add_appends() = MakeAppend(id + 77, 1, 0, 4, &keys);
  EXPECT_EQ(client_->AppendKeys(unknown).status().code(), absl::StatusCode::kNotFound);
  v1::AppendKeysRequest gap;
  *gap.add_appends() = MakeAppend(id, 1, 10, 4, &keys);
  EXPECT_EQ(client_->AppendKeys(gap).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(FreePages(), kPages - 2);
}

TEST_F(GrpcServiceTest, SelectMatchesTheReferenceInBothLayouts) {
  const int32_t layer = 2;
  const uint64_t a = Open();
  const uint64_t b = Open();
  ASSERT_TRUE(AppendRandom(a, layer, 0, 900).ok());
  ASSERT_TRUE(AppendRandom(b, layer, 0, 1000).ok());

  // A prefill that also carries its chunk's keys for b.
  Encoded chunk = RandomKeys(40);
  Encoded queries = RandomQueries(30 + 40);
  v1::SelectRequest request;
  request.set_request_id(31337);
  request.set_layer(layer);
  v1::PrefillRequest* first = request.mutable_prefill()->add_requests();
  first->set_sequence_id(a);
  first->set_prefix_len(870);
  first->set_q_len(30);
  v1::PrefillRequest* second = request.mutable_prefill()->add_requests();
  second->set_sequence_id(b);
  second->set_prefix_len(1000);
  second->set_q_len(40);
  second->set_keys(chunk.bytes);
  request.set_queries(queries.bytes);

  absl::StatusOr<SelectResult> head_major = client_->Select(request);
  ASSERT_TRUE(head_major.ok()) << head_major.status();
  Remember(b, layer, 1000, chunk.values);
  EXPECT_EQ(head_major->request_id, 31337u);
  EXPECT_EQ(head_major->num_heads, 2);
  EXPECT_EQ(head_major->total_q, 70);
  EXPECT_EQ(head_major->topk, 4);
  EXPECT_EQ(head_major->layout, v1::BLOCK_ID_LAYOUT_HEAD_MAJOR);
  EXPECT_EQ(
      head_major->block_ids,
      ReferenceSelect(model_.shape(), {{KeysOf(a, layer), 870, 30}, {KeysOf(b, layer), 1000, 40}},
                      queries.values.data()));

  // The same rows again, token-major; b's keys are now cached.
  request.mutable_prefill()->mutable_requests(1)->clear_keys();
  request.set_layout(v1::BLOCK_ID_LAYOUT_TOKEN_MAJOR);
  absl::StatusOr<SelectResult> token_major = client_->Select(request);
  ASSERT_TRUE(token_major.ok()) << token_major.status();
  EXPECT_EQ(token_major->layout, v1::BLOCK_ID_LAYOUT_TOKEN_MAJOR);
  for (int32_t head = 0; head < 2; ++head) {
    for (int32_t row = 0; row < 70; ++row) {
      for (int32_t slot = 0; slot < 4; ++slot) {
        ASSERT_EQ(token_major->at(head, row, slot), head_major->at(head, row, slot))
            << "head " << head << " row " << row << " slot " << slot;
        EXPECT_EQ(token_major->block_ids[(row * 2 + head) * 4 + slot],
                  head_major->block_ids[(head * 70 + row) * 4 + slot]);
      }
    }
  }
}

TEST_F(GrpcServiceTest, SelectErrorsAreTheCallStatus) {
  const uint64_t id = Open();
  ASSERT_TRUE(AppendRandom(id, kFirstSparseLayer, 0, 200).ok());

  Batch good = Decode(1, kFirstSparseLayer, {{id, 200}});
  absl::StatusOr<SelectResult> ok = client_->Select(good.request);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->block_ids, good.expected);

  v1::SelectRequest dense = good.request;
  dense.set_layer(0);
  EXPECT_EQ(client_->Select(dense).status().code(), absl::StatusCode::kInvalidArgument);
  v1::SelectRequest short_queries = good.request;
  short_queries.mutable_queries()->pop_back();
  EXPECT_EQ(client_->Select(short_queries).status().code(), absl::StatusCode::kInvalidArgument);
  v1::SelectRequest unknown = good.request;
  unknown.mutable_decode()->mutable_requests(0)->set_sequence_id(id + 1);
  EXPECT_EQ(client_->Select(unknown).status().code(), absl::StatusCode::kNotFound);
  v1::SelectRequest missing_keys = good.request;
  missing_keys.mutable_decode()->mutable_requests(0)->set_seq_len(201);
  EXPECT_EQ(client_->Select(missing_keys).status().code(), absl::StatusCode::kFailedPrecondition);
  v1::SelectRequest other_layer = good.request;
  other_layer.set_layer(3);
  EXPECT_EQ(client_->Select(other_layer).status().code(), absl::StatusCode::kFailedPrecondition);
}

TEST_F(GrpcServiceTest, FullCacheIsResourceExhaustedAndOthersAreStillServed) {
  const uint64_t big = Open();
  const uint64_t small = Open();
  ASSERT_TRUE(AppendRandom(big, kFirstSparseLayer, 0, (kPages - 2) * 128).ok());
  ASSERT_TRUE(AppendRandom(small, kFirstSparseLayer, 0, 100).ok());
  ASSERT_EQ(FreePages(), 1);

  const uint64_t late = Open();
  Encoded keys;
  v1::AppendKeysRequest too_big;
  *too_big.add_appends() = MakeAppend(late, kFirstSparseLayer, 0, 300, &keys);
  EXPECT_EQ(client_->AppendKeys(too_big).status().code(), absl::StatusCode::kResourceExhausted);
  // A select that carries more keys than fit is refused the same way.
  Encoded select_keys = RandomKeys(300);
  v1::SelectRequest carries_keys;
  carries_keys.set_layer(kFirstSparseLayer);
  v1::PrefillRequest* prefill = carries_keys.mutable_prefill()->add_requests();
  prefill->set_sequence_id(late);
  prefill->set_q_len(300);
  prefill->set_keys(select_keys.bytes);
  carries_keys.set_queries(RandomQueries(300).bytes);
  EXPECT_EQ(client_->Select(carries_keys).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(FreePages(), 1);

  Batch both = Decode(9, kFirstSparseLayer, {{big, (kPages - 2) * 128}, {small, 100}});
  absl::StatusOr<SelectResult> served = client_->Select(both.request);
  ASSERT_TRUE(served.ok()) << served.status();
  EXPECT_EQ(served->block_ids, both.expected);
  // What still fits is still accepted.
  EXPECT_TRUE(AppendRandom(late, kFirstSparseLayer, 0, 128).ok());
  EXPECT_EQ(FreePages(), 0);
}

TEST_F(GrpcServiceTest, MessageOverTheMaxSizeIsResourceExhausted) {
  const uint64_t id = Open();
  v1::AppendKeysRequest huge;
  v1::KeyAppend* append = huge.add_appends();
  append->set_sequence_id(id);
  append->set_first_layer(kFirstSparseLayer);
  append->set_num_tokens(kMaxMessageBytes / 64 + 1);
  append->set_keys(std::string(kMaxMessageBytes + 64, '\0'));
  EXPECT_EQ(client_->AppendKeys(huge).status().code(), absl::StatusCode::kResourceExhausted);
  // Nothing was applied, and the server carries on.
  EXPECT_EQ(FreePages(), kPages);
  EXPECT_TRUE(AppendRandom(id, kFirstSparseLayer, 0, 10).ok());
}

TEST_F(GrpcServiceTest, StreamAppendKeysAppliesEveryMessage) {
  const uint64_t id = Open();
  std::vector<v1::AppendKeysRequest> requests(3);
  std::vector<Encoded> keys(4);
  *requests[0].add_appends() = MakeAppend(id, 2, 0, 500, &keys[0]);
  *requests[1].add_appends() = MakeAppend(id, 2, 500, 500, &keys[1]);
  *requests[2].add_appends() = MakeAppend(id, 3, 0, 600, &keys[2]);
  *requests[2].add_appends() = MakeAppend(id, 3, 600, 10, &keys[3]);
  absl::StatusOr<uint64_t> appended = client_->StreamAppendKeys(requests);
  ASSERT_TRUE(appended.ok()) << appended.status();
  EXPECT_EQ(*appended, 1610u);
  Remember(id, 2, 0, keys[0].values);
  Remember(id, 2, 500, keys[1].values);
  Remember(id, 3, 0, keys[2].values);
  Remember(id, 3, 600, keys[3].values);
  EXPECT_EQ(FreePages(), kPages - 8);

  Batch layer2 = Decode(1, 2, {{id, 1000}});
  absl::StatusOr<SelectResult> result = client_->Select(layer2.request);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->block_ids, layer2.expected);
  Batch layer3 = Decode(2, 3, {{id, 610}});
  result = client_->Select(layer3.request);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->block_ids, layer3.expected);
}

TEST_F(GrpcServiceTest, StreamAppendKeysStopsAtTheFirstFailingMessage) {
  const uint64_t id = Open();
  std::vector<v1::AppendKeysRequest> requests(3);
  Encoded keys;
  *requests[0].add_appends() = MakeAppend(id, 1, 0, 100, &keys);
  const Encoded first_keys = keys;
  *requests[1].add_appends() = MakeAppend(id, 1, 200, 10, &keys);  // a gap
  *requests[2].add_appends() = MakeAppend(id, 1, 100, 100, &keys);
  EXPECT_EQ(client_->StreamAppendKeys(requests).status().code(),
            absl::StatusCode::kFailedPrecondition);
  Remember(id, 1, 0, first_keys.values);

  // The message before the failure stayed; the one after never ran.
  Batch at_100 = Decode(1, 1, {{id, 100}});
  absl::StatusOr<SelectResult> result = client_->Select(at_100.request);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->block_ids, at_100.expected);
  v1::SelectRequest at_101 = at_100.request;
  at_101.mutable_decode()->mutable_requests(0)->set_seq_len(101);
  EXPECT_EQ(client_->Select(at_101).status().code(), absl::StatusCode::kFailedPrecondition);

  std::vector<v1::AppendKeysRequest> unknown(1);
  *unknown[0].add_appends() = MakeAppend(id + 5, 1, 0, 10, &keys);
  EXPECT_EQ(client_->StreamAppendKeys(unknown).status().code(), absl::StatusCode::kNotFound);
}

TEST_F(GrpcServiceTest, StreamSelectSurvivesAnInBandError) {
  const uint64_t id = Open();
  ASSERT_TRUE(AppendRandom(id, kFirstSparseLayer, 0, 700).ok());
  absl::StatusOr<std::unique_ptr<SelectSession>> session = client_->StartSelectSession();
  ASSERT_TRUE(session.ok()) << session.status();

  Batch first = Decode(1, kFirstSparseLayer, {{id, 700}});
  absl::StatusOr<SelectResult> result = (*session)->Call(first.request);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->request_id, 1u);
  EXPECT_EQ(result->block_ids, first.expected);

  v1::SelectRequest unknown = first.request;
  unknown.set_request_id(2);
  unknown.mutable_decode()->mutable_requests(0)->set_sequence_id(id + 1);
  EXPECT_EQ((*session)->Call(unknown).status().code(), absl::StatusCode::kNotFound);
  v1::SelectRequest dense = first.request;
  dense.set_request_id(3);
  dense.set_layer(0);
  EXPECT_EQ((*session)->Call(dense).status().code(), absl::StatusCode::kInvalidArgument);

  Batch next = Decode(4, kFirstSparseLayer, {{id, 650}});
  result = (*session)->Call(next.request);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->request_id, 4u);
  EXPECT_EQ(result->block_ids, next.expected);
  EXPECT_TRUE((*session)->Close().ok());
}

TEST_F(GrpcServiceTest, StreamSelectAnswersPipelinedRequestsInOrder) {
  const uint64_t a = Open();
  const uint64_t b = Open();
  ASSERT_TRUE(AppendRandom(a, 1, 0, 800).ok());
  ASSERT_TRUE(AppendRandom(b, 1, 0, 1000).ok());
  ASSERT_TRUE(AppendRandom(a, 3, 0, 640).ok());
  absl::StatusOr<std::unique_ptr<SelectSession>> session = client_->StartSelectSession();
  ASSERT_TRUE(session.ok()) << session.status();

  // More requests than the server's in-flight limit (4), all sent before
  // the first read.
  std::vector<Batch> batches;
  for (uint64_t i = 0; i < 8; ++i) {
    const int64_t back = static_cast<int64_t>(i) * 37;
    if (i % 2 == 0) {
      batches.push_back(Decode(100 + i, 1, {{a, 800 - back}, {b, 1000 - back}}));
    } else {
      batches.push_back(Decode(100 + i, 3, {{a, 640 - back}}));
    }
  }
  for (const Batch& batch : batches) {
    ASSERT_TRUE((*session)->Send(batch.request).ok());
  }
  for (const Batch& batch : batches) {
    absl::StatusOr<SelectResult> result = (*session)->Receive();
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->request_id, batch.request.request_id());
    EXPECT_EQ(result->block_ids, batch.expected) << "request " << batch.request.request_id();
  }
  EXPECT_TRUE((*session)->Close().ok());
}

// Every answered selection, streamed or unary, is timed stage by stage; an
// in-band error is not. The stages add up to no more than the whole round
// trip the client saw.
TEST_F(GrpcServiceTest, AnsweredSelectionsAreTimedStageByStage) {
  const uint64_t id = Open();
  ASSERT_TRUE(AppendRandom(id, kFirstSparseLayer, 0, 700).ok());
  const absl::Time start = absl::Now();
  Batch batch = Decode(1, kFirstSparseLayer, {{id, 700}});
  absl::StatusOr<std::unique_ptr<SelectSession>> session = client_->StartSelectSession();
  ASSERT_TRUE(session.ok()) << session.status();
  ASSERT_TRUE((*session)->Call(batch.request).ok());
  v1::SelectRequest bad = batch.request;
  bad.set_layer(0);  // dense: an in-band error
  EXPECT_FALSE((*session)->Call(bad).ok());
  EXPECT_TRUE((*session)->Close().ok());
  ASSERT_TRUE(client_->Select(batch.request).ok());
  const double elapsed = absl::ToDoubleSeconds(absl::Now() - start);

  const HistogramTotals stages =
      ParseHistogram(server_->metrics().Text(), "blocksel_select_stage_seconds", "stage");
  ASSERT_EQ(stages.size(), static_cast<size_t>(kSelectStages));
  double total = 0;
  for (const char* stage : kSelectStageNames) {
    ASSERT_TRUE(stages.contains(stage)) << stage;
    EXPECT_EQ(stages.at(stage).count, 2) << stage;
    EXPECT_GE(stages.at(stage).sum, 0) << stage;
    total += stages.at(stage).sum;
  }
  EXPECT_GT(stages.at("compute").sum, 0);
  EXPECT_LT(total, elapsed);
}

// The client library turns an in-band error into a status; the wire
// response also names the request it answers. Checked with a raw stub.
TEST_F(GrpcServiceTest, StreamSelectErrorsCarryTheirRequestIdInOrder) {
  const uint64_t id = Open();
  ASSERT_TRUE(AppendRandom(id, kFirstSparseLayer, 0, 300).ok());
  std::unique_ptr<v1::BlockSelector::Stub> stub = RawStub();
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + kWaitLimit));
  std::unique_ptr<grpc::ClientReaderWriter<v1::SelectRequest, v1::SelectResponse>> stream =
      stub->StreamSelect(&context);

  Batch good = Decode(41, kFirstSparseLayer, {{id, 300}});
  v1::SelectRequest bad = good.request;
  bad.set_request_id(42);
  bad.clear_queries();
  Batch good_again = Decode(43, kFirstSparseLayer, {{id, 250}});
  v1::SelectRequest not_found = good.request;
  not_found.set_request_id(44);
  not_found.mutable_decode()->mutable_requests(0)->set_sequence_id(id + 3);
  ASSERT_TRUE(stream->Write(good.request));
  ASSERT_TRUE(stream->Write(bad));
  ASSERT_TRUE(stream->Write(good_again.request));
  ASSERT_TRUE(stream->Write(not_found));
  ASSERT_TRUE(stream->WritesDone());

  v1::SelectResponse response;
  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.request_id(), 41u);
  ASSERT_TRUE(response.has_selection());
  absl::StatusOr<std::vector<int32_t>> ids = DecodeBlockIds(response.selection());
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, good.expected);

  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.request_id(), 42u);
  ASSERT_TRUE(response.has_error());
  EXPECT_EQ(response.error().code(), static_cast<int32_t>(grpc::StatusCode::INVALID_ARGUMENT));
  EXPECT_FALSE(response.error().message().empty());

  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.request_id(), 43u);
  ASSERT_TRUE(response.has_selection());
  ids = DecodeBlockIds(response.selection());
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_EQ(*ids, good_again.expected);

  ASSERT_TRUE(stream->Read(&response));
  EXPECT_EQ(response.request_id(), 44u);
  ASSERT_TRUE(response.has_error());
  EXPECT_EQ(response.error().code(), static_cast<int32_t>(grpc::StatusCode::NOT_FOUND));

  EXPECT_FALSE(stream->Read(&response)) << "one response per request";
  grpc::Status status = stream->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
}

TEST_F(GrpcServiceTest, StreamSelectAppliesKeysItCarries) {
  const uint64_t id = Open();
  ASSERT_TRUE(AppendRandom(id, 2, 0, 400).ok());
  absl::StatusOr<std::unique_ptr<SelectSession>> session = client_->StartSelectSession();
  ASSERT_TRUE(session.ok()) << session.status();

  // Decode steps that each bring the new token's key.
  for (int64_t seq_len = 401; seq_len <= 404; ++seq_len) {
    Encoded key = RandomKeys(1);
    Encoded queries = RandomQueries(1);
    v1::SelectRequest request;
    request.set_request_id(static_cast<uint64_t>(seq_len));
    request.set_layer(2);
    v1::DecodeRequest* decode = request.mutable_decode()->add_requests();
    decode->set_sequence_id(id);
    decode->set_seq_len(seq_len);
    decode->set_keys(key.bytes);
    request.set_queries(queries.bytes);
    absl::StatusOr<SelectResult> result = (*session)->Call(request);
    ASSERT_TRUE(result.ok()) << result.status();
    Remember(id, 2, seq_len - 1, key.values);
    EXPECT_EQ(result->block_ids, ReferenceSelect(model_.shape(), {{KeysOf(id, 2), seq_len - 1, 1}},
                                                 queries.values.data()));
  }
  EXPECT_TRUE((*session)->Close().ok());
}

// The standard grpc.health.v1 service, called without its generated code:
// HealthCheckRequest{service: ""} is an empty message, and
// HealthCheckResponse{status: SERVING} is field 1 = 1, bytes 08 01.
TEST_F(GrpcServiceTest, HealthServiceAnswersServing) {
  grpc::GenericStub stub(grpc::CreateChannel(target_, grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + kWaitLimit));
  const std::string no_fields;
  grpc::Slice empty(no_fields);
  grpc::ByteBuffer request(&empty, 1);
  grpc::ByteBuffer response;
  absl::Notification done;
  grpc::Status status;
  stub.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                 [&status, &done](grpc::Status call_status) {
                   status = std::move(call_status);
                   done.Notify();
                 });
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(kWaitLimit));
  ASSERT_TRUE(status.ok()) << status.error_message();
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(response.Dump(&slices).ok());
  std::string bytes;
  for (const grpc::Slice& slice : slices) {
    bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
  }
  EXPECT_EQ(bytes, std::string("\x08\x01", 2));
}

TEST_F(GrpcServiceTest, ShutdownWithAnOpenSessionEndsIt) {
  absl::StatusOr<std::unique_ptr<SelectSession>> session = client_->StartSelectSession();
  ASSERT_TRUE(session.ok()) << session.status();
  // Make sure the call reached the server before shutting it down.
  v1::SelectRequest dense;
  dense.set_layer(0);
  ASSERT_EQ((*session)->Call(dense).status().code(), absl::StatusCode::kInvalidArgument);
  // No snapshot path: shutting down writes none.
  EXPECT_TRUE(absl::IsNotFound(server_->Shutdown(absl::ZeroDuration()).status()));
  absl::StatusOr<SelectResult> after = (*session)->Receive();
  EXPECT_FALSE(after.ok());
  EXPECT_FALSE(client_->GetInfo().ok());
}

// Streams opening and closing while the server shuts down: a call gRPC
// matches at the last moment must still end cleanly (a completion queue
// shut down under a live call aborts the process).
TEST_F(GrpcServiceTest, ShutdownWhileStreamsKeepOpening) {
  server_->Shutdown(absl::ZeroDuration()).IgnoreError();
  for (int round = 0; round < 10; ++round) {
    ServerConfig config;
    config.model = model_;
    config.backend.kind = "cpu";
    config.backend.cpu_threads = 1;
    config.cache_bytes = kPages * model_.PageBytes();
    config.listen_addresses = {"127.0.0.1:0"};
    config.metrics_address = "";
    absl::StatusOr<std::unique_ptr<BlockselServer>> server = BlockselServer::Start(config);
    ASSERT_TRUE(server.ok()) << server.status();
    const std::string target = absl::StrCat("127.0.0.1:", (*server)->port());
    std::atomic<bool> stop{false};
    std::vector<std::thread> clients;
    for (int c = 0; c < 4; ++c) {
      clients.emplace_back([&] {
        auto stub = v1::BlockSelector::NewStub(
            grpc::CreateChannel(target, grpc::InsecureChannelCredentials()));
        v1::SelectRequest dense;
        dense.set_layer(0);  // answered with an in-band error, at once
        while (!stop.load()) {
          grpc::ClientContext context;
          context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(2)));
          auto stream = stub->StreamSelect(&context);
          v1::SelectResponse response;
          if (stream->Write(dense)) stream->Read(&response);
          stream->WritesDone();
          (void)stream->Finish();
        }
      });
    }
    absl::SleepFor(absl::Milliseconds(20 + 10 * round));
    (*server)->Shutdown(absl::ZeroDuration()).IgnoreError();
    stop.store(true);
    for (std::thread& client : clients) client.join();
  }
}

}  // namespace
}  // namespace blocksel
