#!/usr/bin/env bash
# The main job on real LVM (run as root where device-mapper works; scripts/demo.sh runs it
# inside the test VM): a volume group on a loop device, a snapshot, a full snapshot backup,
# writes, a second snapshot, an incremental snapshot backup, a restore to a new LV, a check.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
work="${TMPDIR:-/var/tmp}/lvbackup-demo-lvm"
vg="lvbdemo$$"
rm -rf "$work" && mkdir -p "$work"
truncate -s 1G "$work/pv.img"
loop=$(losetup --find --show "$work/pv.img")
cleanup() { vgremove -ff -q "$vg" >/dev/null 2>&1 || true; losetup -d "$loop" || true; rm -rf "$work"; }
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
printf 'repository: %s/repository\ncatalog: %s/catalog.db\n' "$work" "$work" > "$work/lvbackup.yaml"
export LVBACKUP_CONFIG="$work/lvbackup.yaml"

step "a volume group on $loop, a thin pool and a 64 MiB thin volume with data"
vgcreate -q "$vg" "$loop" >/dev/null
lvcreate -q -y --type thin-pool -L 512m -n pool "$vg" >/dev/null
lvcreate -q -y --type thin -V 64m --thinpool pool -n data "$vg" >/dev/null
python3 -c "
import random; r = random.Random(1)
with open('/dev/$vg/data', 'r+b') as f:
    for i in range(64):
        f.write(r.randbytes(1 << 20) if i % 3 else bytes(1 << 20))
"
lvbackup init
step "snapshot, then a full backup of the snapshot"
lvbackup snapshot create "$vg/data" --name monday
full=$(lvbackup --json create --snapshot "$vg/monday" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
sleep 1  # lv_time has one-second resolution: the next snapshot must be strictly later

step "a day of writes, a second snapshot, an incremental backup of it"
python3 -c "
import random; r = random.Random(2)
with open('/dev/$vg/data', 'r+b') as f:
    for _ in range(10):
        f.seek(r.randrange(0, 64 << 20, 65536)); f.write(r.randbytes(65536))
"
lvbackup snapshot create "$vg/data" --name tuesday
incr=$(lvbackup --json create --snapshot "$vg/tuesday" --incremental | python3 -c 'import json,sys; r = json.load(sys.stdin); assert r["parent_id"]; print(r["id"])')

step "restore the incremental to a new LV and compare it with the snapshot"
lvbackup restore "$incr" --new-volume "$vg/restored"
lvchange -q -ay -K "$vg/tuesday"
cmp -n $((64 << 20)) "/dev/$vg/restored" "/dev/$vg/tuesday"
echo "restored volume matches snapshot tuesday bit for bit"
lvbackup list
lvbackup volumes
echo "LVM demo done (full $full, incremental $incr)."
