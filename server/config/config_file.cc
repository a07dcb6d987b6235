#include "server/config/config_file.h"

#include <algorithm>
#include <fstream>
#include <vector>

#include "absl/flags/commandlineflag.h"
#include "absl/flags/reflection.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "nlohmann/json.hpp"

namespace blocksel {

absl::flat_hash_set<std::string> FlagsOnCommandLine(int argc, char** argv) {
  absl::flat_hash_set<std::string> names;
  for (int i = 1; i < argc; ++i) {
    absl::string_view arg = argv[i];
    if (arg == "--") break;  // positional arguments follow
    if (!absl::ConsumePrefix(&arg, "--")) {
      if (!absl::ConsumePrefix(&arg, "-")) continue;
    }
    const absl::string_view name = arg.substr(0, arg.find('='));
    names.insert(std::string(name));
    if (absl::StartsWith(name, "no")) names.insert(std::string(name.substr(2)));
  }
  return names;
}

absl::Status ApplyConfigFile(const std::string& path,
                             const absl::flat_hash_set<std::string>& on_command_line) {
  std::ifstream file(path);
  if (!file) {
    return absl::InvalidArgumentError(absl::StrCat("cannot read config file ", path));
  }
  const nlohmann::json config = nlohmann::json::parse(file, nullptr, /*allow_exceptions=*/false);
  if (!config.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config file ", path, " is not a JSON object of option names to values"));
  }
  std::vector<std::string> problems;
  for (const auto& [name, value] : config.items()) {
    absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (flag == nullptr || name == "config") {
      problems.push_back(absl::StrCat("unknown option '", name, "'"));
      continue;
    }
    if (on_command_line.contains(name)) continue;  // the command line wins
    if (!value.is_string() && !value.is_number() && !value.is_boolean()) {
      problems.push_back(absl::StrCat("option '", name, "' needs a string, number or boolean"));
      continue;
    }
    const std::string text = value.is_string() ? value.get<std::string>() : value.dump();
    std::string error;
    if (!flag->ParseFrom(text, &error)) {
      problems.push_back(absl::StrCat("option '", name, "': ", error));
    }
  }
  if (problems.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("config file ", path, ": ", absl::StrJoin(problems, "; ")));
}

std::string EffectiveFlags(absl::string_view source_file_suffix) {
  std::vector<std::string> settings;
  for (const auto& [name, flag] : absl::GetAllFlags()) {
    if (absl::EndsWith(flag->Filename(), source_file_suffix)) {
      settings.push_back(absl::StrCat(name, "=", flag->CurrentValue()));
    }
  }
  std::sort(settings.begin(), settings.end());
  return absl::StrJoin(settings, " ");
}

}  // namespace blocksel
