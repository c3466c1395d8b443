# The SIMT emulator runtime (csrc/simt/simt.cpp) as the static library opd_simt, for the Python
# module opd_ext._simt and the C++ tests. Sets OPD_WITH_SIMT.
set(OPD_WITH_SIMT OFF)
string(TOUPPER "${OPD_EXT_SIMT}" _want_simt)
if(DEFINED ENV{OPD_EXT_SIMT})
  string(TOUPPER "$ENV{OPD_EXT_SIMT}" _want_simt)
endif()
if(_want_simt STREQUAL "OFF" OR _want_simt STREQUAL "0")
  message(STATUS "opd_ext: SIMT emulator disabled by OPD_EXT_SIMT=${_want_simt}")
  return()
endif()
if(POLICY CMP0167)
  cmake_policy(SET CMP0167 NEW)  # Boost's own BoostConfig.cmake (Debian ships it), not FindBoost
endif()
find_package(Boost 1.70 QUIET COMPONENTS context)
if(NOT Boost_FOUND)
  if(_want_simt STREQUAL "ON" OR _want_simt STREQUAL "1")
    message(FATAL_ERROR "opd_ext: OPD_EXT_SIMT=ON but Boost.Context was not found (Debian: apt-get install libboost-context-dev)")
  endif()
  message(STATUS "opd_ext: SIMT emulator skipped (Boost.Context not found; Debian: apt-get install libboost-context-dev)")
  return()
endif()
set(OPD_WITH_SIMT ON)
message(STATUS "opd_ext: SIMT emulator ON (Boost ${Boost_VERSION})")

add_library(opd_simt STATIC ${CMAKE_CURRENT_SOURCE_DIR}/csrc/simt/simt.cpp)
target_include_directories(opd_simt PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/csrc ${CMAKE_CURRENT_SOURCE_DIR}/csrc/include)
target_link_libraries(opd_simt PUBLIC Boost::context)
# Kernel source compiled against the emulator: host IEEE arithmetic with nothing fused behind the
# kernel's back (the rounding-mode intrinsics must mean what they say).
target_compile_definitions(opd_simt PUBLIC OPD_SIMT_EMULATOR=1)
target_compile_options(opd_simt PUBLIC -ffp-contract=off)
target_compile_options(opd_simt PRIVATE -Wall -Wextra)
set_target_properties(opd_simt PROPERTIES POSITION_INDEPENDENT_CODE ON)
