#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh) and runs lvbackup's main job on an example image:
# full backup, a day of changes, incremental backup, restore of both, verify, list.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

work="$PWD/demo-work"
rm -rf "$work" && mkdir -p "$work"
cat > "$work/lvbackup.yaml" <<YAML
repository: $work/repository
catalog: $work/catalog.db
YAML
export LVBACKUP_CONFIG="$work/lvbackup.yaml"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "make a 64 MiB example image (holes, text, random data)"
python3 - "$work/disk.img" <<'PY'
import random, sys
rnd = random.Random(42)
with open(sys.argv[1], "wb") as f:
    for i in range(64):
        kind = i % 4
        if kind == 0:
            f.write(bytes(1 << 20))
        elif kind == 1:
            f.write(rnd.randbytes(1 << 20))
        else:
            f.write((f"line {i:06d} of some compressible text\n" * 30000).encode()[: 1 << 20])
PY

step "lvbackup init"
lvbackup init
step "full backup"
full=$(lvbackup --json create --device "$work/disk.img" --name demo-full | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
cp "$work/disk.img" "$work/day1.img"

step "a day of changes: 1 % of the image in scattered 64 KiB writes"
python3 - "$work/disk.img" <<'PY'
import random, sys
rnd = random.Random(7)
with open(sys.argv[1], "r+b") as f:
    for _ in range(10):
        f.seek(rnd.randrange(0, 64 << 20, 65536))
        f.write(rnd.randbytes(65536))
PY
step "incremental backup"
incr=$(lvbackup --json create --device "$work/disk.img" --incremental --name demo-incr | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')

step "restore both and compare"
lvbackup restore "$full" --to-file "$work/restored-full.img"
lvbackup restore "$incr" --to-file "$work/restored-incr.img"
cmp "$work/restored-full.img" "$work/day1.img"
echo "full backup restores bit-exactly"
cmp "$work/restored-incr.img" "$work/disk.img"
echo "incremental backup restores bit-exactly"

step "verify --deep"
lvbackup verify --deep
step "list"
lvbackup list

# The same job on real LVM. This machine's kernel may lack device-mapper: then the demo
# runs inside the test VM (tests/vm), which boots in a few seconds.
step "the main job on real LVM: snapshots, full and incremental snapshot backups, restore"
if [ -e /dev/mapper/control ] && dmsetup version >/dev/null 2>&1 && [ -z "${LVBACKUP_DEMO_VM:-}" ]; then
  bash scripts/demo-lvm.sh
else
  tests/vm/run -- bash scripts/demo-lvm.sh
fi
echo
echo "Demo done (image file and LVM). Repository and catalog are in $work (config: $work/lvbackup.yaml)."
