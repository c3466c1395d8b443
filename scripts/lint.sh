#!/usr/bin/env bash
# Style checks, changing nothing: ruff (lint, then format) over the Python sources, then
# clang-format (.clang-format) over the tracked C++/CUDA files in csrc/ and tests/cpp/. Runs every
# check and fails if any did, saying how to fix it. Expects ruff and clang-format on PATH (the
# virtual environment of scripts/test.sh installs both from requirements-dev.txt); CLANG_FORMAT
# names another clang-format binary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
clang_format=${CLANG_FORMAT:-clang-format}

echo "==> lint (ruff, clang-format)"
for tool in ruff "$clang_format"; do
  if ! command -v "$tool" >/dev/null; then
    echo "error: $tool not found; install the pinned tools with: pip install -r requirements-dev.txt" >&2
    exit 2
  fi
done
failed=0

if ! ruff check .; then
  echo "error: ruff check failed; fix with: ruff format . && ruff check --fix ." >&2
  failed=1
fi
if ! ruff format --check .; then
  echo "error: ruff format --check failed; fix with: ruff format . && ruff check --fix ." >&2
  failed=1
fi

# Other clang-format versions lay out some lines differently: say so when this is not the pinned one.
pinned=$(sed -n 's/^clang-format==\([^ #]*\).*/\1/p' requirements-dev.txt)
found=$("$clang_format" --version | sed -n 's/.*clang-format version \([^ ]*\).*/\1/p')
if [[ -n "$pinned" && "$found" != "$pinned" ]]; then
  echo "warning: $clang_format is version ${found:-unknown}, requirements-dev.txt pins $pinned" >&2
fi
cpp_list=$(git ls-files -- \
  'csrc/*.h' 'csrc/*.hpp' 'csrc/*.cpp' 'csrc/*.cc' 'csrc/*.cu' 'csrc/*.cuh' \
  'tests/cpp/*.h' 'tests/cpp/*.hpp' 'tests/cpp/*.cpp' 'tests/cpp/*.cc' 'tests/cpp/*.cu' 'tests/cpp/*.cuh')
cpp_files=()
if [[ -n "$cpp_list" ]]; then mapfile -t cpp_files <<< "$cpp_list"; fi
if (( ${#cpp_files[@]} )) && ! "$clang_format" --dry-run -Werror "${cpp_files[@]}"; then
  unformatted=()
  for f in "${cpp_files[@]}"; do
    "$clang_format" --dry-run -Werror "$f" 2>/dev/null || unformatted+=("$f")
  done
  echo "error: clang-format check failed; fix with: $clang_format -i ${unformatted[*]}" >&2
  failed=1
fi

exit "$failed"
