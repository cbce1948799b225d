#!/usr/bin/env bash
# Regenerates requirements.lock: every dependency (with the s3 extra and the dev group) at an
# exact version with its hashes, which scripts/setup.sh installs and nothing else. Run it
# after changing dependencies in pyproject.toml, and commit both.
set -euo pipefail
cd "$(dirname "$0")/.."
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
/usr/bin/python3 -m venv "$tools"
"$tools/bin/pip" install -q uv==0.13.10
"$tools/bin/uv" pip compile pyproject.toml --extra s3 --group dev --generate-hashes \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header \
  --output-file requirements.lock
