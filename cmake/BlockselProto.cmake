# blocksel_grpc_proto(<target> <import_dir> <proto relative to import_dir>...)
# Generates message and gRPC service code into ${CMAKE_BINARY_DIR}/gen and
# builds it as a static library.
set(BLOCKSEL_GEN_DIR ${CMAKE_BINARY_DIR}/gen)
function(blocksel_grpc_proto target import_dir)
  set(srcs)
  foreach(rel IN LISTS ARGN)
    string(REGEX REPLACE "\\.proto$" "" base "${BLOCKSEL_GEN_DIR}/${rel}")
    set(out ${base}.pb.cc ${base}.pb.h ${base}.grpc.pb.cc ${base}.grpc.pb.h)
    add_custom_command(
      OUTPUT ${out}
      COMMAND ${CMAKE_COMMAND} -E make_directory ${BLOCKSEL_GEN_DIR}
      COMMAND protobuf::protoc --proto_path=${import_dir}
              --cpp_out=${BLOCKSEL_GEN_DIR} --grpc_out=${BLOCKSEL_GEN_DIR}
              --plugin=protoc-gen-grpc=$<TARGET_FILE:gRPC::grpc_cpp_plugin>
              ${import_dir}/${rel}
      DEPENDS ${import_dir}/${rel} protobuf::protoc gRPC::grpc_cpp_plugin
      VERBATIM)
    list(APPEND srcs ${out})
  endforeach()
  add_library(${target} STATIC ${srcs})
  set_target_properties(${target} PROPERTIES POSITION_INDEPENDENT_CODE ON)
  target_include_directories(${target} PUBLIC $<BUILD_INTERFACE:${BLOCKSEL_GEN_DIR}>
                                               $<INSTALL_INTERFACE:include>)
  target_link_libraries(${target} PUBLIC protobuf::libprotobuf gRPC::grpc++)
endfunction()
