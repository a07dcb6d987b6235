#include "server/engine/backend.h"

#include "absl/strings/str_cat.h"

namespace blocksel {

absl::Status KernelStatusToStatus(KernelStatus status, absl::string_view context,
                                  absl::string_view device_error) {
  switch (status) {
    case KernelStatus::kOk:
      return absl::OkStatus();
    case KernelStatus::kInvalidArgument:
      return absl::InternalError(absl::StrCat(context, ": the kernel rejected a validated batch"));
    case KernelStatus::kUnsupported:
      return absl::UnimplementedError(
          absl::StrCat(context, ": shape not supported by this backend"));
    case KernelStatus::kDeviceError:
      return absl::InternalError(
          absl::StrCat(context, ": device error", device_error.empty() ? "" : ": ", device_error));
  }
  return absl::InternalError(absl::StrCat(context, ": unknown kernel status"));
}

}  // namespace blocksel
