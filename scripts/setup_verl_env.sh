#!/usr/bin/env bash
# The pinned verl (requirements-verl.txt) in its own virtual environment, OPD_VERL_VENV (default
# .venv-verl), layered over the main one (OPD_VENV, default .venv): a .pth file adds the main
# environment's site-packages after its own, so torch and the opd_ext under test (and its verl.plugins
# entry point) come from there and only verl and its pins are installed here. Idempotent: reinstalls
# only when requirements-verl.txt changes. Prints the environment's python.
set -euo pipefail
OPD_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OPD_VENV=${OPD_VENV:-$OPD_ROOT/.venv}
VERL_VENV=${OPD_VERL_VENV:-$OPD_ROOT/.venv-verl}
main_python="$OPD_VENV/bin/python"
[[ -x "$main_python" ]] || { echo "error: no main environment at $OPD_VENV (source scripts/setup_env.sh test first)" >&2; exit 1; }
stamp="$VERL_VENV/.opd_requirements"
want="$(sha256sum "$OPD_ROOT/requirements-verl.txt" | cut -d' ' -f1) $main_python"
if [[ ! -x "$VERL_VENV/bin/python" ]]; then
  "$("$main_python" -c 'import sys; print(sys._base_executable)')" -m venv "$VERL_VENV"
fi
if [[ "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "==> installing requirements-verl.txt into $VERL_VENV (about a minute the first time)" >&2
  main_site=$("$main_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  verl_site=$("$VERL_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # site.addsitedir (not a bare path) so the main environment's own .pth files, the editable
  # install of opd_ext among them, are processed too.
  echo "import site; site.addsitedir('$main_site')" > "$verl_site/zz_opd_ext_main_environment.pth"
  "$VERL_VENV/bin/python" -m pip install -q -r "$OPD_ROOT/requirements-verl.txt" >&2
  echo "$want" > "$stamp"
fi
echo "$VERL_VENV/bin/python"
