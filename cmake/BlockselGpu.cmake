# Resolves BLOCKSEL_GPU to CUDA, HIP or NONE and enables the language.
#
# CUDA: architectures default to sm_90a (Hopper) plus sm_80 (Ampere); .cu
# files are C++17 and include no RPC or logging headers. cudart is static.
# HIP: Debian 12's hipcc/clang-15 targets gfx90a and gfx940 by default
# (gfx942 needs ROCm >= 5.7: pass CMAKE_HIP_ARCHITECTURES with a newer ROCm).
include(CheckLanguage)
if(BLOCKSEL_GPU STREQUAL "AUTO")
  if(NOT DEFINED CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(BLOCKSEL_GPU_BACKEND CUDA)
  else()
    set(BLOCKSEL_GPU_BACKEND NONE)
  endif()
else()
  set(BLOCKSEL_GPU_BACKEND ${BLOCKSEL_GPU})
endif()

if(BLOCKSEL_GPU_BACKEND STREQUAL "CUDA")
  if(NOT DEFINED CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES "80-real;90a-real")
  endif()
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  set(CMAKE_CUDA_RUNTIME_LIBRARY Static)
  find_package(CUDAToolkit REQUIRED)
elseif(BLOCKSEL_GPU_BACKEND STREQUAL "HIP")
  # Debian's ROCm lives in multiarch folders that CMake 3.25's HIP support
  # does not search: a shim root, and the multiarch CMake configs first.
  set(_hip_shim ${CMAKE_BINARY_DIR}/hip-root)
  file(MAKE_DIRECTORY ${_hip_shim}/lib)
  file(CREATE_LINK /usr/lib/x86_64-linux-gnu/cmake ${_hip_shim}/lib/cmake SYMBOLIC)
  set(CMAKE_HIP_COMPILER_ROCM_ROOT ${_hip_shim})
  set(ENV{CMAKE_PREFIX_PATH} "/usr/lib/x86_64-linux-gnu/cmake:$ENV{CMAKE_PREFIX_PATH}")
  # Debian's hipcc drives clang-15; the default clang++ (14) lacks gfx940.
  if(NOT DEFINED CMAKE_HIP_COMPILER AND EXISTS /usr/lib/llvm-15/bin/clang++)
    set(CMAKE_HIP_COMPILER /usr/lib/llvm-15/bin/clang++)
  endif()
  if(NOT DEFINED CMAKE_HIP_ARCHITECTURES)
    set(CMAKE_HIP_ARCHITECTURES "gfx90a;gfx940" CACHE STRING "AMD GPU targets")
  endif()
  set(CMAKE_HIP_FLAGS
      "${CMAKE_HIP_FLAGS} --rocm-path=/usr --rocm-device-lib-path=/usr/lib/x86_64-linux-gnu/amdgcn/bitcode")
  enable_language(HIP)
  find_package(hip CONFIG REQUIRED)
  set(CMAKE_HIP_STANDARD 17)
  set(CMAKE_HIP_STANDARD_REQUIRED ON)
elseif(NOT BLOCKSEL_GPU_BACKEND STREQUAL "NONE")
  message(FATAL_ERROR "BLOCKSEL_GPU must be AUTO, CUDA, HIP or NONE")
endif()
message(STATUS "blocksel GPU backend: ${BLOCKSEL_GPU_BACKEND}")
