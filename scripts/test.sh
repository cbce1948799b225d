#!/usr/bin/env bash
# The whole test suite: the linter, the type checker and the import contracts, unit and CLI
# tests on this machine, and the tests marked `lvm` against real lvm2 and device-mapper
# inside the test VM (tests/vm). Every step runs even when one before it failed; any
# failure fails the run.
#
# The VM suite runs beside the host suites, not after them: its emulated CPU makes it the
# longest step by far, and it leaves most of the host's CPU to the host tests. Its output is
# kept in a file and printed whole once it ends, so the two never interleave.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1

failed=()
step() {
  local name=$1
  shift
  "$@" || failed+=("$name")
}

vm_log=$(mktemp --tmpdir lvbackup-vm-tests.XXXXXX)
# The guest's time limit: past CI's expected length, short of its 90 minutes.
LVBACKUP_VM_TIMEOUT=${LVBACKUP_VM_TIMEOUT:-4800} tests/vm/run-lvm-tests --durations=20 >"$vm_log" 2>&1 &
vm_pid=$!
trap 'kill "$vm_pid" 2>/dev/null; rm -f "$vm_log"' EXIT

step ruff .venv/bin/ruff check lvbackup tests bench
step mypy .venv/bin/mypy lvbackup
step lint-imports .venv/bin/lint-imports --no-cache
step "host tests" .venv/bin/python -m pytest -m "not lvm" --durations=20 tests "$@"
# The command-line suite again, every repository encrypted (docs/security.md).
step "encrypted CLI tests" env LVBACKUP_TEST_ENCRYPTED=1 \
  .venv/bin/python -m pytest -m "not lvm" --durations=20 tests/test_cli.py "$@"

vm_status=0
wait "$vm_pid" || vm_status=$?
echo "=== LVM tests in the VM (tests/vm/run-lvm-tests) ==="
cat "$vm_log"
[ "$vm_status" -eq 0 ] || failed+=("LVM tests in the VM (exit $vm_status)")

if [ "${#failed[@]}" -gt 0 ]; then
  printf 'test.sh: FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "test.sh: all passed"
