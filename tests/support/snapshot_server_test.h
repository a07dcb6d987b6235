// A fixture for child-process tests that stop and restart the server: a
// folder that outlives each server process and holds the snapshot they
// share. Include it from a test built with BLOCKSEL_SERVER_BINARY defined.
#ifndef BLOCKSEL_TESTS_SUPPORT_SNAPSHOT_SERVER_TEST_H_
#define BLOCKSEL_TESTS_SUPPORT_SNAPSHOT_SERVER_TEST_H_

#include <unistd.h>

#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "tests/support/server_process.h"

namespace blocksel::testing {

class SnapshotServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    folder_ = std::filesystem::temp_directory_path() /
              ("blocksel_snapshot_" + std::to_string(::getpid()) + "_" +
               ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(folder_);
    snapshot_path_ = (folder_ / "cache.snapshot").string();
  }
  void TearDown() override { std::filesystem::remove_all(folder_); }

  // Starts the server with --snapshot_path=snapshot_path_, then extra, and
  // waits until it serves and has logged its startup (the snapshot's fate is
  // logged just after the server starts answering).
  std::unique_ptr<ServerProcess> StartServer(std::vector<std::string> extra = {}) {
    extra.push_back("--snapshot_path=" + snapshot_path_);
    auto server = std::make_unique<ServerProcess>(BLOCKSEL_SERVER_BINARY, extra);
    EXPECT_TRUE(
        server->AwaitHealth("", grpc::health::v1::HealthCheckResponse::SERVING, absl::Seconds(30)))
        << server->Log();
    EXPECT_TRUE(server->AwaitLog("serving on", absl::Seconds(30))) << server->Log();
    return server;
  }

  std::filesystem::path folder_;
  std::string snapshot_path_;
};

}  // namespace blocksel::testing

#endif  // BLOCKSEL_TESTS_SUPPORT_SNAPSHOT_SERVER_TEST_H_
