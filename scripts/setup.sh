#!/usr/bin/env bash
# Installs everything lvbackup and its tests need on a fresh Debian 12 machine (idempotent):
# system packages (lvm2, thin-provisioning-tools, and qemu + busybox for the LVM test VM)
# and a virtualenv in .venv with lvbackup installed in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(python3 python3-venv lvm2 thin-provisioning-tools qemu-system-x86 busybox-static zstd xfsprogs nbdkit nbdkit-plugin-python nbd-client)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's own Python: the LVM tests run it inside a software-emulated VM, where it starts
# and runs markedly faster than a shared-library build such as pyenv's.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
# Exactly the versions requirements.lock pins (hashes checked), then lvbackup itself.
.venv/bin/pip install -q --disable-pip-version-check --require-hashes --no-deps \
  -r requirements.lock
.venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
