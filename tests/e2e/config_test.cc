// blocksel-server's configuration as a user gives it: flags, the optional
// JSON config file (flags win), and one clear message per bad value.
#include <filesystem>
#include <fstream>
#include <string>

#include "client/blocksel_client.h"
#include "gtest/gtest.h"
#include "tests/support/server_process.h"

namespace blocksel {
namespace {

using testing::ServerProcess;

constexpr auto kServing = grpc::health::v1::HealthCheckResponse::SERVING;

TEST(ConfigFile, AppliesTheFileAndFlagsWin) {
  // The file sets topk 6 and init 2; the command line sets topk 8 after it.
  const std::filesystem::path folder =
      std::filesystem::temp_directory_path() / "blocksel_config_test";
  std::filesystem::create_directories(folder);
  const std::string path = (folder / "config.json").string();
  std::ofstream(path) << R"({"topk": 6, "init_blocks": 2, "key_dtype": "fp8_e4m3",
                             "default_lease_seconds": 90})";
  ServerProcess server(BLOCKSEL_SERVER_BINARY, {"--config=" + path, "--topk=8"});
  ASSERT_TRUE(server.AwaitHealth("", kServing, absl::Seconds(30))) << server.Log();
  BlockselClient client(server.target());
  absl::StatusOr<v1::GetInfoResponse> info = client.GetInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->model().topk(), 8u);  // the flag
  EXPECT_EQ(info->model().init_blocks(), 2u);
  EXPECT_EQ(info->model().key_dtype(), v1::KEY_DTYPE_FP8_E4M3);
  EXPECT_EQ(info->default_lease_seconds(), 90u);
  // The effective configuration is logged, file values included.
  EXPECT_NE(server.Log().find("init_blocks=2"), std::string::npos) << server.Log();
  std::filesystem::remove_all(folder);
}

TEST(ConfigFile, NamesEveryBadOptionAndExitsWithStatusTwo) {
  const std::filesystem::path folder =
      std::filesystem::temp_directory_path() / "blocksel_config_test_bad";
  std::filesystem::create_directories(folder);
  const std::string path = (folder / "config.json").string();
  std::ofstream(path) << R"({"init_blocks": "many", "no_such_option": 1})";
  ServerProcess server(BLOCKSEL_SERVER_BINARY, {"--config=" + path});
  EXPECT_EQ(server.WaitExit(absl::Seconds(20)), 2);
  const std::string log = server.Log();
  EXPECT_NE(log.find("option 'init_blocks'"), std::string::npos) << log;
  EXPECT_NE(log.find("unknown option 'no_such_option'"), std::string::npos) << log;
  std::filesystem::remove_all(folder);
}

TEST(ConfigFile, InvalidValuesAreAllReportedAtStart) {
  ServerProcess server(BLOCKSEL_SERVER_BINARY,
                       {"--head_dim=24", "--topk=0", "--first_sparse_layer=9"});
  EXPECT_EQ(server.WaitExit(absl::Seconds(20)), 2);
  const std::string log = server.Log();
  EXPECT_NE(log.find("head_dim must be a multiple of 16"), std::string::npos) << log;
  EXPECT_NE(log.find("topk must be in"), std::string::npos) << log;
  EXPECT_NE(log.find("first_sparse_layer must be in"), std::string::npos) << log;
}

}  // namespace
}  // namespace blocksel
