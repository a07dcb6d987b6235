// Uses the installed client library: encoders, the reference, and a call
// to a server that is not there (which must fail cleanly, not hang).
#include <cstdio>
#include <vector>

#include "client/blocksel_client.h"
#include "client/encoding.h"
#include "client/reference_selection.h"
#include "client/routed_client.h"

int main() {
  const std::vector<float> values = {1.0f, -2.5f, 0.125f};
  if (blocksel::DecodeBf16(blocksel::EncodeBf16(values)) != values) {
    std::fprintf(stderr, "bf16 round trip failed\n");
    return 1;
  }
  blocksel::ClientOptions options;
  options.timeout = absl::Seconds(2);
  options.max_attempts = 1;
  blocksel::RoutedClient client({"unix:/nonexistent/blocksel.sock"}, options);
  const absl::StatusOr<blocksel::v1::GetInfoResponse> info = client.server(0).GetInfo();
  if (info.ok() || !absl::IsUnavailable(info.status())) {
    std::fprintf(stderr, "expected UNAVAILABLE, got %s\n", info.status().ToString().c_str());
    return 1;
  }
  std::printf("consumer: linked blocksel::blocksel_client; an absent server is UNAVAILABLE\n");
  return 0;
}
