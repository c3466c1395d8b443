#!/usr/bin/env bash
# One-command verification on a lent GPU machine; also runs on a CPU-only machine, where every
# GPU-only step prints why it is skipped.
#
#   bash benchmarks/gpu_verify.sh                  # everything, inside VERIFY_BUDGET_S seconds
#   VERIFY_STEPS=build,bench bash benchmarks/gpu_verify.sh
#
# Steps: env, build (pip install --no-build-isolation --no-deps -e .), info (python -m opd_ext
# info), cuda-tests (pytest -m cuda), tests (pytest -m "not cuda and not emu": the rest of the
# suite), memcheck + racecheck + synccheck (compute-sanitizer over benchmarks/sanitize_ops.py), ceiling (copy
# bandwidth), bench (every benchmarks/bench_*.py), report. Writes at most 5 files to $OUT
# (default ./out): summary.md, verify.log, bench.csv, bench.png, details.tar.gz (every step's log,
# the per-op CSVs/PNGs, JUnit XML). The summary table is printed last.
#
# Environment knobs:
#   VERIFY_BUDGET_S   wall-clock budget for the whole script (default 570 with a GPU, to fit remote
#                     runners that stop a command at 600 s; 1800 without). Each step gets min(its cap, what is
#                     left - a reserve for the report), so the summary is always written.
#   VERIFY_STEPS      comma list of the steps above (default: all).
#   VERIFY_INSTALL    pip (default with a GPU: pip install -e . into the current python) |
#                     overlay (default without: the same pip command into build/verify-venv, a venv
#                     layered over the current one, so a shared environment stays untouched) | skip.
#   VERIFY_BENCH_ARGS extra arguments for every bench script (e.g. "--baselines eager").
#   VERIFY_WORK       scratch folder (default build/verify; wiped at the start).
#   OPD_GIT_COMMIT    commit recorded in the CSVs when the tree has no .git (device machines).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
START=$SECONDS
RESERVE=25
STEPS=",${VERIFY_STEPS:-env,build,info,cuda-tests,tests,memcheck,racecheck,synccheck,ceiling,bench,report},"
OUT=${OUT:-$REPO/out}
WORK=${VERIFY_WORK:-$REPO/build/verify}  # scratch: step logs, per-op CSVs (wiped first)
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}
rm -rf "$WORK" && mkdir -p "$WORK/logs" "$WORK/bench" "$OUT"
LOG=$OUT/verify.log
: >"$LOG"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

SUMMARY=()
say() { echo "$*" | tee -a "$LOG"; }
record() { SUMMARY+=("| $1 | $2 | $3 | $4 |"); say ">>> $1: $2 (${3}s) $4"; }
want() { [[ $STEPS == *",$1,"* ]]; }
left() { echo $((BUDGET - (SECONDS - START))); }

# run_step NAME CAP_SECONDS CMD...: runs CMD with a timeout of min(CAP, budget left - reserve),
# logs to $WORK/logs/NAME.log and the main log, and records PASS / FAIL / TIMEOUT.
run_step() {
  local name=$1 cap=$2
  shift 2
  local limit
  limit=$(($(left) - RESERVE))
  ((limit > cap)) && limit=$cap
  if ((limit < 10)); then
    record "$name" SKIP 0 "no time left in the ${BUDGET}s budget"
    return 1
  fi
  say "=== $name (timeout ${limit}s): $*"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/logs/$name.log" >>"$LOG"
  rc=${PIPESTATUS[0]}
  local took=$((SECONDS - t0)) note
  note=$(grep -E "passed|failed|ERROR SUMMARY|RACECHECK SUMMARY|copy ceiling|[Ee]rror|^SKIP|^wrote .*csv" \
    "$WORK/logs/$name.log" | tail -1 | sed -E 's#/[^ ]*/##g' | cut -c1-110)
  if ((rc == 124 || rc == 137)); then
    record "$name" TIMEOUT "$took" "stopped at ${limit}s; ${note}"
  elif ((rc == 0)) && grep -q "^SKIP" "$WORK/logs/$name.log" && ! grep -q "^wrote" "$WORK/logs/$name.log"; then
    record "$name" SKIP "$took" "$note"
  elif ((rc == 0)); then
    record "$name" PASS "$took" "$note"
  else
    record "$name" FAIL "$took" "exit $rc; ${note}"
  fi
  return "$rc"
}

skip() { record "$1" SKIP 0 "$2"; }

HAVE_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 &&
  "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  HAVE_GPU=1
fi
# GPU runners often stop a command at 600 s; a CPU-only machine has no such limit but may be slow.
BUDGET=${VERIFY_BUDGET_S:-$([[ $HAVE_GPU == 1 ]] && echo 570 || echo 1800)}
say "gpu_verify: repo $REPO, python $PYTHON, GPU visible: $HAVE_GPU, budget ${BUDGET}s, steps ${STEPS:1:-1}"

# ---- env ---------------------------------------------------------------------------------------
if want env; then
  run_step env 30 bash -c "
    '$PYTHON' -c 'import sys, torch; print(\"python\", sys.version.split()[0]); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"device\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
    (nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || echo 'nvidia-smi: not available')
    (nvcc --version | tail -2 || echo 'nvcc: not found')
    (compute-sanitizer --version | tail -1 || echo 'compute-sanitizer: not found')
    nproc; free -g | head -2"
fi

# ---- build -------------------------------------------------------------------------------------
INSTALL=${VERIFY_INSTALL:-$([[ $HAVE_GPU == 1 ]] && echo pip || echo overlay)}
if want build; then
  if [[ $HAVE_GPU == 1 && -z ${TORCH_CUDA_ARCH_LIST:-} ]]; then
    # Only this GPU's architecture: half the nvcc time of the default sm_80 + sm_90.
    TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST
    say "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST (this GPU)"
  fi
  if [[ $HAVE_GPU == 0 && -z ${OPD_EXT_CUDA:-} ]]; then
    export OPD_EXT_CUDA=0
    say "no GPU: building the CPU kernels only (OPD_EXT_CUDA=1 compiles the .cu files anyway)"
  fi
  case $INSTALL in
    pip)
      run_step build 300 "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . ;;
    overlay)
      # A venv whose site-packages chain to the current interpreter's (a .pth line), so the editable
      # install lands in build/verify-venv and the current environment is not modified.
      VENV=$REPO/build/verify-venv
      "$PYTHON" -m venv --without-pip --clear "$VENV" &&
        "$PYTHON" -c "import site; print('\n'.join(site.getsitepackages()))" \
          >"$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/parent_env.pth"
      PYTHON=$VENV/bin/python
      run_step build 300 "$PYTHON" -m pip install --no-build-isolation --no-deps -e . ;;
    *)
      skip build "VERIFY_INSTALL=$INSTALL" ;;
  esac
fi

# Everything below imports the installed package, not the source tree's opd_ext/ folder.
cd "$WORK" || exit 1
if want info; then
  run_step info 60 "$PYTHON" -m opd_ext info
fi

# ---- tests -------------------------------------------------------------------------------------
PYTEST=("$PYTHON" -m pytest "$REPO/tests" -q -rs -p no:cacheprovider --rootdir "$REPO")
if "$PYTHON" -c "import xdist" 2>/dev/null; then
  PYTEST+=(-n "$(($(nproc) > 8 ? 8 : $(nproc)))")
fi
if [[ ! -d $REPO/tests ]]; then
  want cuda-tests && skip cuda-tests "no tests/ folder in this tree"
  want tests && skip tests "no tests/ folder in this tree"
else
  if want cuda-tests; then
    if [[ $HAVE_GPU == 1 ]]; then
      run_step cuda-tests 150 "${PYTEST[@]}" -m cuda --junitxml="$WORK/logs/cuda-tests.xml"
    else
      skip cuda-tests "no GPU visible (the cuda-marked tests skip themselves here)"
    fi
  fi
  if want tests; then
    # The emulated-CUDA tests are for machines without a GPU; here the kernels run for real.
    run_step tests 200 "${PYTEST[@]}" -m "not cuda and not emu" --junitxml="$WORK/logs/tests.xml"
  fi
fi

# ---- compute-sanitizer -------------------------------------------------------------------------
SANITIZE=("$PYTHON" "$REPO/benchmarks/sanitize_ops.py")
for tool in memcheck racecheck synccheck; do
  want $tool || continue
  if [[ $HAVE_GPU == 0 ]]; then
    skip $tool "no GPU visible"
    continue
  fi
  if ! command -v compute-sanitizer >/dev/null; then
    skip $tool "compute-sanitizer not on PATH"
    continue
  fi
  # Instrument only our kernels (they live in namespace opd::cuda, so their names contain "opd"):
  # torch's own kernels would multiply the run time and are not under test.
  filter=()
  compute-sanitizer --help 2>/dev/null | grep -q -- "--kernel-name" && filter=(--kernel-name kns=opd)
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step $tool 120 compute-sanitizer --tool $tool "${filter[@]}" \
    --error-exitcode 3 --print-limit 50 "${SANITIZE[@]}"
done
if [[ $HAVE_GPU == 0 ]] && { want memcheck || want racecheck || want synccheck; }; then
  run_step sanitize-drivers-cpu 60 "${SANITIZE[@]}" --device cpu
fi

# ---- copy ceiling and benchmarks ---------------------------------------------------------------
if want ceiling; then
  run_step ceiling 60 "$PYTHON" "$REPO/benchmarks/harness.py"
fi
if want bench; then
  BENCH_ARGS=(--out-dir "$WORK/bench" ${VERIFY_BENCH_ARGS:-})
  [[ $HAVE_GPU == 0 ]] && BENCH_ARGS+=(--quick) && say "no GPU: benchmarks in --quick mode on the CPU"
  # Training-shape ops first: their bandwidth goals are the headline numbers.
  BENCH_OPS=()
  for op in token_stats vopd_loss reverse_kl_loss topk_overlap drift_step fused_linear; do
    if [[ -f $REPO/benchmarks/bench_$op.py ]]; then BENCH_OPS+=("$op"); else
      skip "bench-$op" "no benchmarks/bench_$op.py in this tree"; fi
  done
  for i in "${!BENCH_OPS[@]}"; do
    # An equal share of what is left, so one slow script cannot starve the rest; each script
    # writes its CSV after every case, so one stopped at its share keeps the cases it finished.
    share=$((($(left) - RESERVE) / (${#BENCH_OPS[@]} - i)))
    run_step "bench-${BENCH_OPS[$i]}" "$share" "$PYTHON" "$REPO/benchmarks/bench_${BENCH_OPS[$i]}.py" "${BENCH_ARGS[@]}"
  done
fi

# ---- report ------------------------------------------------------------------------------------
if want report; then
  RESERVE=5 run_step report 60 "$PYTHON" "$REPO/benchmarks/report.py" --results "$WORK/bench" --include-quick \
    --md "$WORK/bench.md" --csv "$OUT/bench.csv" --png "$OUT/bench.png"
fi
cp "$LOG" "$WORK/logs/verify.log"
tar czf "$OUT/details.tar.gz" -C "$WORK" logs bench $(cd "$WORK" && ls bench.md 2>/dev/null)

{
  echo "# gpu_verify summary"
  echo
  echo "$(date -u +%FT%TZ), GPU visible: $HAVE_GPU, total $((SECONDS - START))s of ${BUDGET}s, commit ${OPD_GIT_COMMIT:-$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
  echo
  [[ -f $WORK/bench.md ]] && cat "$WORK/bench.md" && echo
  echo "| step | status | seconds | note |"
  echo "|---|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
} >"$OUT/summary.md"
echo
cat "$OUT/summary.md"
grep -q "| FAIL \|| TIMEOUT " "$OUT/summary.md" && exit 1
exit 0
