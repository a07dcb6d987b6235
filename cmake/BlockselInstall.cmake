# `cmake --install` lays out a relocatable tree: bin/ (the programs),
# lib/ (every shared library they load but the C runtime and the GPU
# driver), and the client library with its headers, the generated API
# headers and a CMake package (blocksel::blocksel_client; blocksel::kernels,
# the kernel library for in-process callers). CPack makes it a tarball:
# `cpack -G TGZ --config build/<preset>/CPackConfig.cmake`.
include(CMakePackageConfigHelpers)
include(GNUInstallDirs)

target_include_directories(blocksel_client PUBLIC $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
install(TARGETS blocksel_client blocksel_proto EXPORT blockselTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(FILES client/async_select_session.h client/blocksel_client.h client/encoding.h client/reference_selection.h
              client/layer_groups.h client/routed_client.h
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/client)
set(blocksel_kernel_targets blocksel_kernels blocksel_kernels_cpu)
if(TARGET blocksel_kernels_gpu)
  list(APPEND blocksel_kernel_targets blocksel_kernels_gpu)
endif()
target_include_directories(blocksel_kernels INTERFACE
  $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
install(TARGETS ${blocksel_kernel_targets} EXPORT blockselTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(FILES kernels/selection_types.h kernels/numeric_formats.h
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/kernels)
install(FILES kernels/cpu/cpu_selector.h kernels/cpu/page_scorer.h kernels/cpu/thread_pool.h
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/kernels/cpu)
install(FILES kernels/gpu/gpu_selection.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/kernels/gpu)
install(FILES proto/blocksel/v1/wire_limits.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/proto/blocksel/v1)
install(FILES ${BLOCKSEL_GEN_DIR}/blocksel/v1/block_selector.pb.h
              ${BLOCKSEL_GEN_DIR}/blocksel/v1/block_selector.grpc.pb.h
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/blocksel/v1)
install(EXPORT blockselTargets NAMESPACE blocksel::
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/blocksel)
configure_package_config_file(cmake/blockselConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/blockselConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/blocksel)
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/blockselConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/blockselConfig.cmake
              ${CMAKE_CURRENT_BINARY_DIR}/blockselConfigVersion.cmake
        DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/blocksel)

install(RUNTIME_DEPENDENCY_SET blocksel_runtime
  DESTINATION lib
  # The C/C++ runtime and the GPU driver come from the host.
  PRE_EXCLUDE_REGEXES
    "^(ld-linux|linux-vdso|libc|libm|libdl|libpthread|librt|libresolv|libgcc_s|libstdc\\+\\+|libcuda)\\.so"
  POST_EXCLUDE_REGEXES "^/lib64/")

if(BLOCKSEL_GPU_BACKEND STREQUAL "CUDA")
  set(blocksel_flavor cuda)
elseif(BLOCKSEL_GPU_BACKEND STREQUAL "HIP")
  set(blocksel_flavor hip)
else()
  set(blocksel_flavor cpu)
endif()
set(CPACK_GENERATOR TGZ)
set(CPACK_PACKAGE_NAME blocksel)
set(CPACK_PACKAGE_VENDOR blocksel)
set(CPACK_PACKAGE_FILE_NAME
    "blocksel-${PROJECT_VERSION}-${blocksel_flavor}-linux-${CMAKE_SYSTEM_PROCESSOR}")
set(CPACK_INCLUDE_TOPLEVEL_DIRECTORY ON)
include(CPack)
