# Defines the interface target `opd::torch` (headers, libraries and ABI flags of the torch that
# Python imports) and, when requested and possible, enables CUDA with the matching runtime.
#
# Inputs:  Python_EXECUTABLE, OPD_EXT_CUDA (AUTO|ON|OFF), env TORCH_CUDA_ARCH_LIST
# Outputs: opd::torch, OPD_WITH_CUDA, OPD_CUDA_ARCHS, OPD_TORCH_VERSION, OPD_TORCH_CUDA_VERSION

execute_process(
  COMMAND "${Python_EXECUTABLE}" "${CMAKE_CURRENT_LIST_DIR}/torch_config.py"
  OUTPUT_VARIABLE _torch_config
  ERROR_VARIABLE _torch_config_err
  RESULT_VARIABLE _torch_config_rc)
if(NOT _torch_config_rc EQUAL 0)
  message(FATAL_ERROR
    "opd_ext: could not import torch from ${Python_EXECUTABLE}:\n${_torch_config_err}\n"
    "Install torch first and build with `pip install --no-build-isolation .` so the build sees it.")
endif()
string(REPLACE "\n" ";" _torch_config_lines "${_torch_config}")
foreach(_line IN LISTS _torch_config_lines)
  if(_line MATCHES "^([A-Z_0-9]+)=(.*)$")
    set(_TC_${CMAKE_MATCH_1} "${CMAKE_MATCH_2}")
  endif()
endforeach()
# The two lists above were flattened by the line split; re-read them from their own lines.
string(REGEX MATCH "TORCH_INCLUDE_DIRS=([^\n]*)" _ "${_torch_config}")
set(_TC_TORCH_INCLUDE_DIRS "${CMAKE_MATCH_1}")
string(REGEX MATCH "NVIDIA_PIP_INCLUDE_DIRS=([^\n]*)" _ "${_torch_config}")
set(_TC_NVIDIA_PIP_INCLUDE_DIRS "${CMAKE_MATCH_1}")

set(OPD_TORCH_VERSION "${_TC_TORCH_VERSION}")
set(OPD_TORCH_CUDA_VERSION "${_TC_TORCH_CUDA_VERSION}")
message(STATUS "opd_ext: torch ${OPD_TORCH_VERSION} (CUDA '${OPD_TORCH_CUDA_VERSION}') at ${_TC_TORCH_LIBRARY_DIR}")

add_library(opd_torch INTERFACE)
add_library(opd::torch ALIAS opd_torch)
target_include_directories(opd_torch SYSTEM INTERFACE ${_TC_TORCH_INCLUDE_DIRS})
target_compile_definitions(opd_torch INTERFACE _GLIBCXX_USE_CXX11_ABI=${_TC_TORCH_CXX11_ABI})
foreach(_lib c10 torch torch_cpu)
  find_library(OPD_LIB_${_lib} NAMES ${_lib} PATHS "${_TC_TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH REQUIRED)
  target_link_libraries(opd_torch INTERFACE "${OPD_LIB_${_lib}}")
endforeach()
set(OPD_TORCH_LIBRARY_DIR "${_TC_TORCH_LIBRARY_DIR}")

# at::parallel_for is inline OpenMP in torch's headers, so kernels compile with -fopenmp. Link the
# libgomp torch ships when it ships one: one OpenMP runtime (and thread pool) per process.
add_library(opd_openmp INTERFACE)
add_library(opd::openmp ALIAS opd_openmp)
find_library(OPD_TORCH_GOMP NAMES libgomp.so.1 gomp PATHS "${_TC_TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH)
if(OPD_TORCH_GOMP)
  target_compile_options(opd_openmp INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-fopenmp>)
  target_link_libraries(opd_openmp INTERFACE "${OPD_TORCH_GOMP}")
else()
  find_package(OpenMP REQUIRED COMPONENTS CXX)
  target_link_libraries(opd_openmp INTERFACE OpenMP::OpenMP_CXX)
endif()

# ---- CUDA -------------------------------------------------------------------------------------
set(OPD_WITH_CUDA OFF)
set(OPD_CUDA_ARCHS "")
string(TOUPPER "${OPD_EXT_CUDA}" _want_cuda)

function(_opd_cuda_unavailable reason)
  if(_want_cuda STREQUAL "ON" OR _want_cuda STREQUAL "1")
    message(FATAL_ERROR "opd_ext: OPD_EXT_CUDA=1 but CUDA kernels cannot be built: ${reason}")
  endif()
  message(STATUS "opd_ext: building CPU kernels only (${reason})")
endfunction()

if(_want_cuda STREQUAL "OFF" OR _want_cuda STREQUAL "0")
  message(STATUS "opd_ext: CUDA kernels disabled by OPD_EXT_CUDA=${OPD_EXT_CUDA}")
elseif(OPD_TORCH_CUDA_VERSION STREQUAL "")
  _opd_cuda_unavailable("torch ${OPD_TORCH_VERSION} is a CPU-only build")
else()
  if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX})
    find_program(OPD_NVCC nvcc
      HINTS "$ENV{CUDA_HOME}/bin" "$ENV{CUDA_PATH}/bin" /usr/local/cuda/bin /opt/cuda/bin)
    if(OPD_NVCC)
      set(CMAKE_CUDA_COMPILER "${OPD_NVCC}")
    endif()
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    _opd_cuda_unavailable("no nvcc found (set CUDA_HOME or CUDACXX)")
  else()
    set(OPD_WITH_CUDA ON)
  endif()
endif()

if(OPD_WITH_CUDA)
  # Architectures: TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0+PTX") wins, then the visible GPU, then
  # sm_80 + sm_90 with PTX so a driverless build machine still produces a useful binary.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
    set(_archs "")
    if(DEFINED ENV{TORCH_CUDA_ARCH_LIST} AND NOT "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL "")
      string(REPLACE " " ";" _arch_list "$ENV{TORCH_CUDA_ARCH_LIST}")
      foreach(_a IN LISTS _arch_list)
        if(_a STREQUAL "")
          continue()
        endif()
        string(REGEX MATCH "^([0-9]+)\\.([0-9]+)([a-z]?)(\\+PTX)?$" _ok "${_a}")
        if(NOT _ok)
          message(FATAL_ERROR "opd_ext: cannot parse TORCH_CUDA_ARCH_LIST entry '${_a}' (expected e.g. 8.0, 9.0a or 9.0+PTX)")
        endif()
        set(_num "${CMAKE_MATCH_1}${CMAKE_MATCH_2}${CMAKE_MATCH_3}")
        list(APPEND _archs "${_num}-real")
        if(CMAKE_MATCH_4)
          list(APPEND _archs "${_num}-virtual")
        endif()
      endforeach()
    elseif(NOT _TC_VISIBLE_CUDA_ARCH STREQUAL "")
      set(_archs "${_TC_VISIBLE_CUDA_ARCH}-real")
    else()
      set(_archs "80-real;90-real;90-virtual")
    endif()
    set(CMAKE_CUDA_ARCHITECTURES "${_archs}")
  endif()
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  # Link the shared runtime: at import time it resolves to the libcudart torch already loaded.
  set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  set(OPD_CUDA_ARCHS "${CMAKE_CUDA_ARCHITECTURES}")
  message(STATUS "opd_ext: CUDA kernels ON, nvcc ${CMAKE_CUDA_COMPILER_VERSION}, archs ${OPD_CUDA_ARCHS}")

  add_library(opd_torch_cuda INTERFACE)
  add_library(opd::torch_cuda ALIAS opd_torch_cuda)
  target_link_libraries(opd_torch_cuda INTERFACE opd::torch CUDA::cudart)
  foreach(_lib c10_cuda torch_cuda)
    find_library(OPD_LIB_${_lib} NAMES ${_lib} PATHS "${_TC_TORCH_LIBRARY_DIR}" NO_DEFAULT_PATH REQUIRED)
    target_link_libraries(opd_torch_cuda INTERFACE "${OPD_LIB_${_lib}}")
  endforeach()
  # Toolkit headers come first; pip's nvidia/* headers only fill what a partial toolkit lacks
  # (cublas, cusparse, nvrtc), which some torch CUDA headers include.
  target_include_directories(opd_torch_cuda SYSTEM AFTER INTERFACE ${_TC_NVIDIA_PIP_INCLUDE_DIRS})
  set(_nvcc_flags --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__
    -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
    -Xcudafe=--diag_suppress=20012)
  target_compile_options(opd_torch_cuda INTERFACE "$<$<COMPILE_LANGUAGE:CUDA>:${_nvcc_flags}>")
endif()
