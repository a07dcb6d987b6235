// Limits of the blocksel.v1 wire protocol that clients and servers share.
#ifndef BLOCKSEL_PROTO_BLOCKSEL_V1_WIRE_LIMITS_H_
#define BLOCKSEL_PROTO_BLOCKSEL_V1_WIRE_LIMITS_H_

#include <cstdint>

namespace blocksel {

// The largest gRPC message either side sends or accepts unless configured
// otherwise (a server reports its own in GetInfo.max_message_bytes).
inline constexpr int64_t kDefaultMaxMessageBytes = int64_t{64} << 20;

}  // namespace blocksel

#endif  // BLOCKSEL_PROTO_BLOCKSEL_V1_WIRE_LIMITS_H_
