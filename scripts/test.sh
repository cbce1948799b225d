#!/usr/bin/env bash
# The whole test suite: the linter and the type checker, unit and CLI tests on this machine,
# then the tests marked `lvm` against real lvm2 and device-mapper inside the test VM
# (tests/vm). Any failure fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check lvbackup tests bench
.venv/bin/mypy lvbackup
.venv/bin/lint-imports --no-cache
.venv/bin/python -m pytest -m "not lvm" --durations=20 tests "$@"
# The command-line suite again, every repository encrypted (docs/security.md).
LVBACKUP_TEST_ENCRYPTED=1 .venv/bin/python -m pytest -m "not lvm" --durations=20 tests/test_cli.py "$@"
tests/vm/run-lvm-tests
