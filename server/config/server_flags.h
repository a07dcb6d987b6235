// blocksel-server's command-line flags and the ServerConfig they make. Each
// flag's default is the ServerConfig (or component option) default, so the
// two cannot drift apart.
#ifndef BLOCKSEL_SERVER_CONFIG_SERVER_FLAGS_H_
#define BLOCKSEL_SERVER_CONFIG_SERVER_FLAGS_H_

#include <cstdint>
#include <string>

#include "absl/flags/declare.h"
#include "absl/status/statusor.h"
#include "server/blocksel_server.h"

// The flags main() reads itself; the rest only feed ServerConfigFromFlags.
ABSL_DECLARE_FLAG(std::string, listen);
ABSL_DECLARE_FLAG(std::string, metrics_address);
ABSL_DECLARE_FLAG(int64_t, cache_mib);
ABSL_DECLARE_FLAG(int64_t, drain_propagation_seconds);
ABSL_DECLARE_FLAG(int64_t, shutdown_grace_seconds);
ABSL_DECLARE_FLAG(std::string, log_level);
ABSL_DECLARE_FLAG(std::string, config);
ABSL_DECLARE_FLAG(int, select_every);
ABSL_DECLARE_FLAG(std::string, selecting_layers);
ABSL_DECLARE_FLAG(std::string, audit_layers);
ABSL_DECLARE_FLAG(int, audit_every);

namespace blocksel {

// The source file defining every server flag, for EffectiveFlags.
inline constexpr char kServerFlagsFile[] = "server/config/server_flags.cc";

// The configuration the flags give; INVALID_ARGUMENT naming every bad value.
absl::StatusOr<ServerConfig> ServerConfigFromFlags();

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_CONFIG_SERVER_FLAGS_H_
