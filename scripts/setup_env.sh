# Sourced by scripts/test.sh and scripts/example.sh: creates the virtual environment on first use,
# installs requirements-dev.txt when it changed, (re)builds opd_ext into it (incremental: only
# changed sources recompile) and activates it. OPD_VENV overrides the location (default .venv).
set -euo pipefail
OPD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OPD_VENV=${OPD_VENV:-$OPD_ROOT/.venv}

if [[ ! -x "$OPD_VENV/bin/python" ]]; then
  echo "==> creating virtual environment $OPD_VENV"
  python3 -m venv "$OPD_VENV"
fi
# shellcheck disable=SC1091
source "$OPD_VENV/bin/activate"

requirements_hash=$(sha256sum "$OPD_ROOT/requirements-dev.txt" | cut -d' ' -f1)
if [[ "$(cat "$OPD_VENV/.opd_requirements" 2>/dev/null)" != "$requirements_hash" ]]; then
  echo "==> installing requirements-dev.txt (torch is large: a few minutes the first time)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r "$OPD_ROOT/requirements-dev.txt"
  echo "$requirements_hash" >"$OPD_VENV/.opd_requirements"
fi

echo "==> building opd_ext (CPU kernels; CUDA kernels too when nvcc is found)"
( cd "$OPD_ROOT" && python -m pip install -q --no-build-isolation --no-deps -e . )
python -m opd_ext info | sed 's/^/    /'
