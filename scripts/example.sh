#!/usr/bin/env bash
# The reference run: on-policy distillation with vOPD + Prune-OPD on a built-in task (no downloads).
# Arguments go to examples/train_opd.py (see --help; e.g. --method opd|vopd|prune|prune+vopd).
set -euo pipefail
# --quiet quiets the setup too: nothing but errors before the run's final line.
for _arg in "$@"; do
  if [[ "$_arg" == --quiet ]]; then export OPD_QUIET=1; fi
done
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" example
cd "$OPD_ROOT"
exec python examples/train_opd.py "$@"
