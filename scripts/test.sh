#!/usr/bin/env bash
# Runs every test: the lit suite (dialect, passes, specs, CPU numerics) and
# the C++ unit tests. Ends with one line: "N passed, N failed".
set -uo pipefail
cd "$(dirname "$0")/.."
cmake --build build >/dev/null || { echo "build failed"; echo "0 passed, 1 failed"; exit 1; }

passed=0; failed=0
lit_log=$(mktemp)
/usr/lib/llvm-22/bin/lit -v build/test 2>&1 | tee "$lit_log" | grep -E "^(PASS|FAIL|XPASS|UNRESOLVED):|^  (Passed|Failed)" || true
lp=$(grep -oE "^  Passed *: *[0-9]+" "$lit_log" | grep -oE "[0-9]+$" || echo 0)
lf=$(grep -oE "^  (Failed|Unresolved|Unexpectedly Passed) *: *[0-9]+" "$lit_log" | grep -oE "[0-9]+$" | awk '{s += $1} END {print s + 0}')
passed=$((passed + ${lp:-0})); failed=$((failed + ${lf:-0}))
if ! grep -qE "^  Passed" "$lit_log"; then failed=$((failed + 1)); fi

if [ -x build/bin/attn-unittests ]; then
  unit_log=$(mktemp)
  build/bin/attn-unittests --gtest_brief=1 2>&1 | tee "$unit_log" | tail -3
  up=$(grep -oE "^\[  PASSED  \] [0-9]+" "$unit_log" | grep -oE "[0-9]+$" || echo 0)
  uf=$(grep -oE "^\[  FAILED  \] [0-9]+ test" "$unit_log" | grep -oE "[0-9]+" | head -1 || echo 0)
  passed=$((passed + ${up:-0})); failed=$((failed + ${uf:-0}))
  [ -n "$up" ] || failed=$((failed + 1))
else
  echo "unit tests not built"; failed=$((failed + 1))
fi

py_log=$(mktemp)
PYTHONPATH=python /usr/bin/python3 -m pytest -q -p no:cacheprovider python/tests 2>&1 | tee "$py_log" | tail -3
pp=$(grep -oE "[0-9]+ passed" "$py_log" | tail -1 | grep -oE "[0-9]+" || echo 0)
pf=$(grep -oE "[0-9]+ (failed|error)" "$py_log" | grep -oE "[0-9]+" | awk '{s += $1} END {print s + 0}')
passed=$((passed + ${pp:-0})); failed=$((failed + ${pf:-0}))
[ "${pp:-0}" -gt 0 ] || failed=$((failed + 1))

echo "${passed} passed, ${failed} failed"
[ "$failed" -eq 0 ]
