#!/usr/bin/env bash
# In-place development build: compiles into build/dev[-cpu] and copies _C*.so into opd_ext/, so
# `PYTHONPATH=$PWD python -m pytest` runs against the working tree without a pip install.
# OPD_EXT_CUDA=0 skips the (slow to compile) CUDA kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=$(command -v "${PYTHON:-python}")
build_dir=build/dev
[[ "${OPD_EXT_CUDA:-}" == "0" ]] && build_dir=build/dev-cpu
cmake -S . -B "$build_dir" -G Ninja -DPython_EXECUTABLE="$python_bin" -DOPD_EXT_BUILD_TESTS=OFF >/dev/null
cmake --build "$build_dir"
