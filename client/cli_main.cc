// blocksel-cli: one-shot calls to a blocksel server, for operators and
// scripts.
//
//   blocksel-cli [--server=host:port] COMMAND [flags]
//     health      grpc.health.v1 Check of --service ("" is liveness, the
//                 default blocksel.v1.BlockSelector is readiness); exit 0
//                 only when SERVING
//     info        model config, cache occupancy, backend, limits
//     open        open a sequence (--id, 0: the server picks; --lease_seconds)
//     release     release --id
//     renew       renew the leases of --ids=1,2,3
//     append      append --keys_file (raw little-endian keys of the server's
//                 dtype, [layers][tokens][D]) to --id at --start, layers
//                 --layer .. --layer + --num_layers - 1
//     select      run the SelectRequest in --request (protobuf text format,
//                 or JSON when the name ends in .json); --queries_file
//                 replaces its queries with raw bf16 bytes
//     snapshot    write the server's cache snapshot now
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "client/blocksel_client.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/json_util.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/client_context.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"

ABSL_FLAG(std::string, server, "localhost:50051", "Server address (host:port or unix:/path)");
ABSL_FLAG(double, timeout_seconds, 10, "Deadline of the call");
ABSL_FLAG(std::string, service, "blocksel.v1.BlockSelector",
          "health: the service name to check (\"\" is liveness)");
ABSL_FLAG(uint64_t, id, 0, "open, release, append: the sequence id");
ABSL_FLAG(uint32_t, lease_seconds, 0, "open: the lease (0: the server's default)");
ABSL_FLAG(std::string, ids, "", "renew: comma-separated sequence ids");
ABSL_FLAG(uint32_t, layer, 0, "append: the first (absolute, sparse) layer");
ABSL_FLAG(uint32_t, num_layers, 1, "append: layers in the keys file");
ABSL_FLAG(uint64_t, start, 0, "append: position of the first token");
ABSL_FLAG(std::string, keys_file, "", "append: raw keys, [layers][tokens][D]");
ABSL_FLAG(std::string, request, "", "select: a SelectRequest, text format or .json");
ABSL_FLAG(std::string, queries_file, "", "select: raw bf16 queries replacing the request's");
ABSL_FLAG(bool, json, false, "Print results as JSON");

namespace blocksel {
namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::ostringstream contents;
  contents << file.rdbuf();
  return contents.str();
}

void Print(const google::protobuf::Message& message) {
  std::string text;
  if (absl::GetFlag(FLAGS_json)) {
    google::protobuf::util::JsonPrintOptions options;
    options.add_whitespace = true;
    (void)google::protobuf::util::MessageToJsonString(message, &text, options);
  } else {
    google::protobuf::TextFormat::PrintToString(message, &text);
  }
  std::printf("%s", text.c_str());
}

absl::Status Health() {
  auto channel =
      grpc::CreateChannel(absl::GetFlag(FLAGS_server), grpc::InsecureChannelCredentials());
  auto stub = grpc::health::v1::Health::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(
      absl::ToChronoTime(absl::Now() + absl::Seconds(absl::GetFlag(FLAGS_timeout_seconds))));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(absl::GetFlag(FLAGS_service));
  grpc::health::v1::HealthCheckResponse response;
  grpc::Status status = stub->Check(&context, request, &response);
  if (!status.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
  }
  const std::string state =
      grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status());
  std::printf("%s\n", state.c_str());
  if (response.status() != grpc::health::v1::HealthCheckResponse::SERVING) {
    return absl::UnavailableError(absl::StrCat("service '", request.service(), "' is ", state));
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::SelectRequest> LoadSelectRequest() {
  const std::string path = absl::GetFlag(FLAGS_request);
  if (path.empty()) return absl::InvalidArgumentError("select needs --request");
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) return text.status();
  v1::SelectRequest request;
  if (absl::EndsWith(path, ".json")) {
    auto parsed = google::protobuf::util::JsonStringToMessage(*text, &request);
    if (!parsed.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": ", parsed.ToString()));
    }
  } else if (!google::protobuf::TextFormat::ParseFromString(*text, &request)) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, " is not a SelectRequest in protobuf text format"));
  }
  if (!absl::GetFlag(FLAGS_queries_file).empty()) {
    absl::StatusOr<std::string> queries = ReadFile(absl::GetFlag(FLAGS_queries_file));
    if (!queries.ok()) return queries.status();
    request.set_queries(*std::move(queries));
  }
  return request;
}

void PrintSelection(const SelectResult& result) {
  if (absl::GetFlag(FLAGS_json)) {
    std::printf(
        "{\"request_id\": %llu, \"num_heads\": %d, \"total_q\": %d, \"topk\": %d, "
        "\"block_ids\": [%s]}\n",
        static_cast<unsigned long long>(result.request_id), result.num_heads, result.total_q,
        result.topk, absl::StrJoin(result.block_ids, ", ").c_str());
    return;
  }
  for (int32_t head = 0; head < result.num_heads; ++head) {
    for (int32_t row = 0; row < result.total_q; ++row) {
      std::vector<int32_t> ids;
      for (int32_t slot = 0; slot < result.topk; ++slot) ids.push_back(result.at(head, row, slot));
      std::printf("head %d row %d: %s\n", head, row, absl::StrJoin(ids, " ").c_str());
    }
  }
}

absl::Status Run(const std::string& command) {
  if (command == "health") return Health();
  ClientOptions options;
  options.timeout = absl::Seconds(absl::GetFlag(FLAGS_timeout_seconds));
  BlockselClient client(absl::GetFlag(FLAGS_server), options);
  if (command == "info") {
    absl::StatusOr<v1::GetInfoResponse> info = client.GetInfo();
    if (!info.ok()) return info.status();
    Print(*info);
    return absl::OkStatus();
  }
  if (command == "open") {
    absl::StatusOr<uint64_t> id =
        client.OpenSequence(absl::GetFlag(FLAGS_id), absl::GetFlag(FLAGS_lease_seconds));
    if (!id.ok()) return id.status();
    std::printf("%llu\n", static_cast<unsigned long long>(*id));
    return absl::OkStatus();
  }
  if (command == "release") {
    absl::StatusOr<bool> released = client.ReleaseSequence(absl::GetFlag(FLAGS_id));
    if (!released.ok()) return released.status();
    std::printf("%s\n", *released ? "released" : "was not open");
    return absl::OkStatus();
  }
  if (command == "renew") {
    std::vector<uint64_t> ids;
    for (absl::string_view text :
         absl::StrSplit(absl::GetFlag(FLAGS_ids), ',', absl::SkipEmpty())) {
      uint64_t id = 0;
      if (!absl::SimpleAtoi(text, &id)) {
        return absl::InvalidArgumentError(absl::StrCat("--ids: '", text, "' is not an id"));
      }
      ids.push_back(id);
    }
    return client.RenewLease(ids);
  }
  if (command == "append") {
    absl::StatusOr<v1::GetInfoResponse> info = client.GetInfo();
    if (!info.ok()) return info.status();
    absl::StatusOr<std::string> keys = ReadFile(absl::GetFlag(FLAGS_keys_file));
    if (!keys.ok()) return keys.status();
    const uint64_t token_bytes = uint64_t{info->model().head_dim()} *
                                 (info->model().key_dtype() == v1::KEY_DTYPE_BF16 ? 2 : 1) *
                                 absl::GetFlag(FLAGS_num_layers);
    if (keys->empty() || keys->size() % token_bytes != 0) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--keys_file holds ", keys->size(), " bytes, not a whole number of tokens of ",
          token_bytes, " bytes (D x key bytes x layers)"));
    }
    v1::AppendKeysRequest request;
    v1::KeyAppend* append = request.add_appends();
    append->set_sequence_id(absl::GetFlag(FLAGS_id));
    append->set_first_layer(absl::GetFlag(FLAGS_layer));
    append->set_num_layers(absl::GetFlag(FLAGS_num_layers));
    append->set_start_position(absl::GetFlag(FLAGS_start));
    append->set_num_tokens(static_cast<uint32_t>(keys->size() / token_bytes));
    append->set_keys(*std::move(keys));
    absl::StatusOr<uint64_t> appended = client.AppendKeys(request);
    if (!appended.ok()) return appended.status();
    std::printf("appended %llu keys\n", static_cast<unsigned long long>(*appended));
    return absl::OkStatus();
  }
  if (command == "select") {
    absl::StatusOr<v1::SelectRequest> request = LoadSelectRequest();
    if (!request.ok()) return request.status();
    absl::StatusOr<SelectResult> result = client.Select(*request);
    if (!result.ok()) return result.status();
    PrintSelection(*result);
    return absl::OkStatus();
  }
  if (command == "snapshot") {
    absl::StatusOr<v1::WriteSnapshotResponse> written = client.WriteSnapshot();
    if (!written.ok()) return written.status();
    Print(*written);
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown command '", command,
                   "'; commands: health, info, open, release, renew, append, select, snapshot"));
}

}  // namespace
}  // namespace blocksel

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "blocksel-cli [--server=host:port] "
      "health|info|open|release|renew|append|select|snapshot [flags]");
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() != 2) {
    std::fprintf(stderr, "usage: %s\n", absl::ProgramUsageMessage().data());
    return 2;
  }
  const absl::Status status = blocksel::Run(positional[1]);
  if (!status.ok()) {
    std::fprintf(stderr, "%s\n", status.ToString().c_str());
    return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}
