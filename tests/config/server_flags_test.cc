#include "server/config/server_flags.h"

#include <cstdint>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "gtest/gtest.h"

namespace blocksel {
namespace {

// With no flag given, the flags make exactly the default ServerConfig: every
// default is written once and the flags take it from there.
TEST(ServerFlagsTest, UnsetFlagsGiveTheDefaultConfig) {
  absl::StatusOr<ServerConfig> from_flags = ServerConfigFromFlags();
  ASSERT_TRUE(from_flags.ok()) << from_flags.status();
  const ServerConfig defaults;
  const ServerConfig& flags = *from_flags;
  EXPECT_EQ(flags.model.ToString(), defaults.model.ToString());
  EXPECT_EQ(flags.model.audited_layers, defaults.model.audited_layers);
  EXPECT_EQ(flags.model.audit_every, defaults.model.audit_every);
  EXPECT_EQ(flags.backend.kind, defaults.backend.kind);
  EXPECT_EQ(flags.backend.cpu_threads, defaults.backend.cpu_threads);
  EXPECT_EQ(flags.backend.gpu_device, defaults.backend.gpu_device);
  EXPECT_EQ(flags.backend.gpu_graph_max_batch, defaults.backend.gpu_graph_max_batch);
  EXPECT_EQ(flags.backend.gpu_graph_max_tokens, defaults.backend.gpu_graph_max_tokens);
  EXPECT_EQ(flags.cache_bytes, defaults.cache_bytes);
  EXPECT_EQ(flags.max_sequences, defaults.max_sequences);
  EXPECT_EQ(flags.default_lease, defaults.default_lease);
  EXPECT_EQ(flags.max_lease, defaults.max_lease);
  EXPECT_EQ(flags.listen_addresses, defaults.listen_addresses);
  EXPECT_EQ(flags.max_message_bytes, defaults.max_message_bytes);
  EXPECT_EQ(flags.max_inflight_per_stream, defaults.max_inflight_per_stream);
  EXPECT_EQ(flags.stream_threads, defaults.stream_threads);
  EXPECT_EQ(flags.queue_capacity, defaults.queue_capacity);
  EXPECT_EQ(flags.engine_idle_spin, defaults.engine_idle_spin);
  EXPECT_EQ(flags.batch_window, defaults.batch_window);
  EXPECT_EQ(flags.batch_max_rows, defaults.batch_max_rows);
  EXPECT_EQ(flags.snapshot_path, defaults.snapshot_path);
  EXPECT_EQ(flags.grpc_memory_bytes, defaults.grpc_memory_bytes);
  EXPECT_EQ(flags.metrics_address, defaults.metrics_address);
  EXPECT_EQ(flags.colocated.max_attachments, defaults.colocated.max_attachments);
  EXPECT_EQ(flags.colocated.max_region_bytes, defaults.colocated.max_region_bytes);
}

TEST(ServerFlagsTest, SelectEveryOrALayerListMakesTheSelectingLayers) {
  absl::SetFlag(&FLAGS_select_every, 4);
  absl::StatusOr<ServerConfig> every = ServerConfigFromFlags();
  ASSERT_TRUE(every.ok()) << every.status();
  EXPECT_EQ(every->model.selecting_layers.size(), 15u);
  EXPECT_EQ(every->model.selecting_layers.front(), 3);
  EXPECT_EQ(every->model.selecting_layers.back(), 59);
  absl::SetFlag(&FLAGS_selecting_layers, std::string("3,9"));
  EXPECT_EQ(ServerConfigFromFlags().status().message(),
            "--select_every=4 and --selecting_layers=3,9 both set the selecting layers; set one");
  absl::SetFlag(&FLAGS_select_every, 1);
  absl::StatusOr<ServerConfig> listed = ServerConfigFromFlags();
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(listed->model.selecting_layers, (std::vector<int32_t>{3, 9}));
  absl::SetFlag(&FLAGS_selecting_layers, std::string("4,9"));
  EXPECT_EQ(ServerConfigFromFlags().status().code(), absl::StatusCode::kInvalidArgument);
  absl::SetFlag(&FLAGS_selecting_layers, std::string());
  absl::SetFlag(&FLAGS_select_every, 0);
  EXPECT_EQ(ServerConfigFromFlags().status().message(), "--select_every must be >= 1, got 0");
  absl::SetFlag(&FLAGS_select_every, 1);
}

TEST(ServerFlagsTest, AuditLayersAndEveryMakeTheAudit) {
  absl::SetFlag(&FLAGS_select_every, 4);  // layers 3, 7, 11, ... select
  absl::SetFlag(&FLAGS_audit_layers, std::string("4,9"));
  absl::SetFlag(&FLAGS_audit_every, 10);
  absl::StatusOr<ServerConfig> audited = ServerConfigFromFlags();
  ASSERT_TRUE(audited.ok()) << audited.status();
  EXPECT_EQ(audited->model.audited_layers, (std::vector<int32_t>{4, 9}));
  EXPECT_EQ(audited->model.audit_every, 10);
  absl::SetFlag(&FLAGS_audit_layers, std::string("4,x"));
  EXPECT_EQ(ServerConfigFromFlags().status().message(),
            "--audit_layers: layer list '4,x': 'x' is not a layer number; write e.g. 3,7,11");
  absl::SetFlag(&FLAGS_audit_layers, std::string("7"));
  EXPECT_EQ(ServerConfigFromFlags().status().message(),
            "invalid model config: audited layer 7 is a selecting layer (selecting layers are "
            "3,7,11,15,19,23,27,31,35,39,43,47,51,55,59); audit only layers that reuse a "
            "selection");
  absl::SetFlag(&FLAGS_audit_layers, std::string("4"));
  absl::SetFlag(&FLAGS_audit_every, 0);
  EXPECT_EQ(ServerConfigFromFlags().status().message(),
            "invalid model config: audit_every must be >= 1, got 0");
  absl::SetFlag(&FLAGS_audit_every, 1);
  absl::SetFlag(&FLAGS_select_every, 1);
  EXPECT_EQ(ServerConfigFromFlags().status().message(),
            "invalid model config: audited layer 4 selects, as every sparse layer does without "
            "selecting layers: set --select_every or --selecting_layers so that some layers "
            "reuse a selection");
  absl::SetFlag(&FLAGS_audit_layers, std::string());
}

// The defaults the README documents, through the component options.
TEST(ServerFlagsTest, DefaultsAreTheDocumentedOnes) {
  const ServerConfig defaults;
  EXPECT_EQ(defaults.metrics_address, "0.0.0.0:9464");
  EXPECT_EQ(defaults.listen_addresses, std::vector<std::string>{"0.0.0.0:50051"});
  EXPECT_EQ(defaults.max_sequences, 65536);
  EXPECT_EQ(defaults.max_message_bytes, int64_t{64} << 20);
  EXPECT_EQ(defaults.default_lease, absl::Seconds(600));
  EXPECT_EQ(defaults.max_lease, absl::Seconds(86400));
  EXPECT_EQ(defaults.queue_capacity, 1024);
  EXPECT_EQ(defaults.batch_max_rows, 4096);
  EXPECT_EQ(defaults.max_inflight_per_stream, 4);
}

}  // namespace
}  // namespace blocksel
