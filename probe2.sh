set -e
D=/mnt/lvbackup-data/probe; mkdir -p $D; cd /tmp
truncate -s 1G $D/disk.img; L=$(losetup -f --show $D/disk.img)
pvcreate -q $L >/dev/null; vgcreate -q probevg $L >/dev/null
lvcreate -q -y -L 48M -n lin probevg >/dev/null
dd if=/dev/urandom of=/dev/probevg/lin bs=1M count=48 status=none
for ver in /work/wt/old /work/main; do
  for v in /work/wt/old /work/main; do [ -d $v ] || echo "missing $v"; done
  n=$(basename $ver); mkdir -p $D/$n
  printf 'repository: %s\ncatalog: %s\n' "$D/$n/repo" "$D/$n/cat.db" > $D/$n/c.yaml
  run() { s=$(date +%s.%N); PYTHONPATH=$ver /work/main/.venv/bin/python -m lvbackup.launcher --config $D/$n/c.yaml "$@" >/dev/null; e=$(date +%s.%N); echo "$n $1 $(echo "$e - $s" | bc)"; }
  run init
  run create --volume probevg/lin
  for i in 1 2 3; do dd if=/dev/urandom of=/dev/probevg/lin bs=4k count=10 seek=$((i*100)) status=none conv=fsync; run create --volume probevg/lin; done
  run list
  PYTHONPATH=$ver /work/main/.venv/bin/python -X importtime -m lvbackup.launcher --version 2>&1 | sort -t'|' -k2 -n | tail -3
done
