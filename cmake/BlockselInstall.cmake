# `cmake --install` puts the client library, its headers and the generated
# API headers under the prefix with a CMake package (blocksel::blocksel_client),
# next to the binaries the subprojects install.
include(CMakePackageConfigHelpers)
include(GNUInstallDirs)

target_include_directories(blocksel_client PUBLIC $<INSTALL_INTERFACE:${CMAKE_INSTALL_INCLUDEDIR}>)
install(TARGETS blocksel_client blocksel_proto EXPORT blockselTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(FILES client/async_select_session.h client/blocksel_client.h client/encoding.h client/reference_selection.h
              client/routed_client.h
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/client)
install(FILES kernels/selection_types.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/kernels)
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
