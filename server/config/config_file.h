// An optional JSON config file for blocksel-server: an object of flag names
// to values, applied to the flags the command line did not set (flags win).
#ifndef BLOCKSEL_SERVER_CONFIG_CONFIG_FILE_H_
#define BLOCKSEL_SERVER_CONFIG_CONFIG_FILE_H_

#include <string>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace blocksel {

// The names of the flags argv sets ("--name=value", "--name value",
// "--noname"), read before absl parses the command line.
absl::flat_hash_set<std::string> FlagsOnCommandLine(int argc, char** argv);

// Reads path and sets each named flag that is not in on_command_line.
// INVALID_ARGUMENT naming every problem: an unreadable file, text that is
// not a JSON object, an unknown option, a value the flag rejects.
absl::Status ApplyConfigFile(const std::string& path,
                             const absl::flat_hash_set<std::string>& on_command_line);

// "name=value" for every flag defined in the file source_file_suffix names
// (e.g. "server/main.cc"), sorted: the effective configuration, for logs.
std::string EffectiveFlags(absl::string_view source_file_suffix);

}  // namespace blocksel

#endif  // BLOCKSEL_SERVER_CONFIG_CONFIG_FILE_H_
