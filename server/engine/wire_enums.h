// Checks of the API's enum fields against what this server accepts. An
// enum value a message carries may be one this build does not know (a
// newer client, a damaged message): protobuf keeps it as a number, so every
// enum field is checked before its value means anything.
#ifndef BLOCKSEL_SERVER_ENGINE_WIRE_ENUMS_H_
#define BLOCKSEL_SERVER_ENGINE_WIRE_ENUMS_H_

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "blocksel/v1/block_selector.pb.h"
#include "kernels/selection_types.h"

namespace blocksel {

// OK for KEY_DTYPE_UNSPECIFIED ("the server's") and for the server's own
// dtype; INVALID_ARGUMENT naming `field` for an unknown value or another
// dtype.
absl::Status CheckKeyDtype(v1::KeyDtype dtype, KeyDtype server_dtype, absl::string_view field);

// OK for unspecified and bf16, the queries the kernels take.
absl::Status CheckQueryDtype(v1::QueryDtype dtype);

// OK for the two layouts the API defines.
absl::Status CheckLayout(v1::BlockIdLayout layout);

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_ENGINE_WIRE_ENUMS_H_
