// Early-return helpers for absl::Status, which Abseil 20220623 does not ship.
#ifndef BLOCKSEL_SERVER_COMMON_STATUS_MACROS_H_
#define BLOCKSEL_SERVER_COMMON_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define BLOCKSEL_STATUS_CONCAT_INNER_(a, b) a##b
#define BLOCKSEL_STATUS_CONCAT_(a, b) BLOCKSEL_STATUS_CONCAT_INNER_(a, b)

// Returns the status of expr from the enclosing function unless it is OK.
#define BLOCKSEL_RETURN_IF_ERROR(expr)                   \
  do {                                                   \
    ::absl::Status blocksel_status_ = (expr);            \
    if (!blocksel_status_.ok()) return blocksel_status_; \
  } while (false)

// Evaluates expr (an absl::StatusOr<T>); returns its status unless it is OK,
// else moves its value into lhs (a declaration or an assignable name).
#define BLOCKSEL_ASSIGN_OR_RETURN(lhs, expr) \
  BLOCKSEL_ASSIGN_OR_RETURN_IMPL_(BLOCKSEL_STATUS_CONCAT_(blocksel_statusor_, __LINE__), lhs, expr)
#define BLOCKSEL_ASSIGN_OR_RETURN_IMPL_(statusor, lhs, expr) \
  auto statusor = (expr);                                    \
  if (!statusor.ok()) return std::move(statusor).status();   \
  lhs = std::move(statusor).value()

#endif  // BLOCKSEL_SERVER_COMMON_STATUS_MACROS_H_
