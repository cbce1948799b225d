#!/usr/bin/env bash
# Installs everything lvbackup and its tests need on a fresh Debian 12 machine (idempotent):
# system packages (lvm2, thin-provisioning-tools, and qemu + busybox for the LVM test VM)
# and a virtualenv in .venv with lvbackup installed in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(lvm2 thin-provisioning-tools qemu-system-x86 busybox-static zstd)
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

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
