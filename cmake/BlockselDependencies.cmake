# Debian 12 packages (scripts/setup.sh installs them).
# protobuf 3.21 ships no CMake config on Debian: module mode. gRPC's config
# calls find_package(Protobuf) itself.
find_package(Threads REQUIRED)
find_package(ZLIB REQUIRED)
find_package(Protobuf REQUIRED)
find_package(gRPC CONFIG REQUIRED)
find_package(absl CONFIG REQUIRED)
find_package(spdlog CONFIG REQUIRED)
find_package(nlohmann_json CONFIG REQUIRED)
find_package(prometheus-cpp CONFIG REQUIRED)
if(BLOCKSEL_BUILD_TESTS)
  find_package(GTest REQUIRED)
endif()
if(BLOCKSEL_BUILD_BENCH)
  find_package(benchmark CONFIG REQUIRED)
endif()
