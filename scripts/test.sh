#!/usr/bin/env bash
# Every test: GoogleTest (ctest) over csrc/include, then pytest. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$OPD_ROOT"

if [[ ! -f /usr/include/gtest/gtest.h && -z "${OPD_SKIP_CPP_TESTS:-}" ]]; then
  echo "==> installing GoogleTest (Debian libgtest-dev)"
  if ! { apt-get install -y -q libgtest-dev >/dev/null 2>&1 ||
         { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libgtest-dev >/dev/null 2>&1; }; }; then
    echo "error: GoogleTest is missing and could not be installed; run 'apt-get install libgtest-dev'" \
         "as root, or set OPD_SKIP_CPP_TESTS=1 to run only pytest" >&2
    exit 1
  fi
fi

if [[ -z "${OPD_SKIP_CPP_TESTS:-}" ]]; then
  echo "==> C++ tests (ctest)"
  cmake -S . -B build/cpp-tests -G Ninja -DOPD_EXT_MATH_ONLY=ON >/dev/null
  cmake --build build/cpp-tests
  ctest --test-dir build/cpp-tests --output-on-failure
fi

echo "==> Python tests (pytest)"
python -m pytest -q "$@"
