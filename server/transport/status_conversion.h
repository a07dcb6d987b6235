// absl and gRPC status codes are the same numbers; only the types differ.
#ifndef BLOCKSEL_SERVER_TRANSPORT_STATUS_CONVERSION_H_
#define BLOCKSEL_SERVER_TRANSPORT_STATUS_CONVERSION_H_

#include <string>

#include "absl/status/status.h"
#include "grpcpp/support/status.h"

namespace blocksel {

inline grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_TRANSPORT_STATUS_CONVERSION_H_
