#include "server/engine/wire_enums.h"

#include "absl/strings/str_cat.h"
#include "server/engine/model_config.h"

namespace blocksel {

absl::Status CheckKeyDtype(v1::KeyDtype dtype, KeyDtype server_dtype, absl::string_view field) {
  switch (dtype) {
    case v1::KEY_DTYPE_UNSPECIFIED:
      return absl::OkStatus();
    case v1::KEY_DTYPE_BF16:
    case v1::KEY_DTYPE_FP8_E4M3: {
      const KeyDtype asked = dtype == v1::KEY_DTYPE_BF16 ? KeyDtype::kBf16 : KeyDtype::kFp8E4m3;
      if (asked == server_dtype) return absl::OkStatus();
      return absl::InvalidArgumentError(absl::StrCat(field, " ", v1::KeyDtype_Name(dtype),
                                                     " does not match the server's key dtype ",
                                                     KeyDtypeName(server_dtype)));
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(field, " ", static_cast<int>(dtype),
                       " is not a KeyDtype; send KEY_DTYPE_UNSPECIFIED (0) or the server's dtype ",
                       KeyDtypeName(server_dtype)));
  }
}

absl::Status CheckQueryDtype(v1::QueryDtype dtype) {
  if (dtype == v1::QUERY_DTYPE_UNSPECIFIED || dtype == v1::QUERY_DTYPE_BF16) {
    return absl::OkStatus();
  }
  const std::string name = v1::QueryDtype_IsValid(dtype) ? v1::QueryDtype_Name(dtype)
                                                         : absl::StrCat(static_cast<int>(dtype));
  return absl::InvalidArgumentError(
      absl::StrCat("query_dtype ", name, " is not supported; send bf16 queries"));
}

absl::Status CheckLayout(v1::BlockIdLayout layout) {
  if (v1::BlockIdLayout_IsValid(layout)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("layout ", static_cast<int>(layout),
                   " is not a BlockIdLayout; use BLOCK_ID_LAYOUT_HEAD_MAJOR (0) or "
                   "BLOCK_ID_LAYOUT_TOKEN_MAJOR (1)"));
}

}  // namespace blocksel
