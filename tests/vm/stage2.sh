# Stage 2 of the lvbackup test VM (see README.md). The initramfs /init runs it with the
# host's own /bin/sh, chrooted into the host's root filesystem (read-only 9p + tmpfs
# overlay). vm.py copies it into the per-run directory, mounted at /run/lvbackup-vm, so
# changing it needs no rebuild. Anything failing here ends the run without an exit marker,
# which the host reports as a VM failure together with this console output.
set -eu
rundir=/run/lvbackup-vm
. "$rundir/settings"  # CHECKOUT=<absolute path of the checkout on the host>

# The checkout, read-write, at the same absolute path as on the host.
mkdir -p "$CHECKOUT"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose checkout "$CHECKOUT"

# The per-run data disk (ext4 made by the host): room for LVM loop files and test
# repositories (TMPDIR) without using guest RAM. noinit_itable: no background zeroing.
data=/mnt/lvbackup-data
mkdir -p "$data"
mount -o noinit_itable /dev/vda "$data"
mkdir -m 1777 "$data/tmp"
# A directory on 9p with cache=none (the run directory's mount): no shared writable mmap,
# like many network filesystems, for the tests of what lvbackup does on one.
ninep="$rundir/scratch"
mkdir -m 1777 "$ninep"

# Nothing runs udev, lvmpolld or dmeventd here: LVM must create /dev nodes itself and not
# wait for them. No metadata backups/archives either (tests make thousands of changes).
cat >/etc/lvm/lvm.conf <<'EOF'
devices {
	use_devicesfile = 0
	obtain_device_list_from_udev = 0
	external_device_info_source = "none"
	multipath_component_detection = 0
	md_component_detection = 0
}
activation {
	udev_sync = 0
	udev_rules = 0
	monitoring = 0
}
global {
	use_lvmpolld = 0
	event_activation = 0
}
backup {
	backup = 0
	archive = 0
}
EOF
echo lvbackup-vm >/proc/sys/kernel/hostname

# The command's stdout/stderr reach the host through ttyS1/ttyS2. They are relayed
# through FIFOs so that the command sees pipes, as under CI, rather than terminals;
# raw mode stops the tty from turning \n into \r\n.
stty -F /dev/ttyS1 raw -echo clocal
stty -F /dev/ttyS2 raw -echo clocal
mkfifo /run/lvbackup-out /run/lvbackup-err
cat /run/lvbackup-out >/dev/ttyS1 &
relays=$!
cat /run/lvbackup-err >/dev/ttyS2 &
relays="$relays $!"

. "$rundir/cmd"  # set -- NAME=VALUE... CMD ARGS... (the environment forwarded by the host, then the command)
cd "$CHECKOUT"
set +e
env -i TMPDIR="$data/tmp" LVBACKUP_VM_DATA="$data" LVBACKUP_VM_9P="$ninep" LVM_SUPPRESS_FD_WARNINGS=1 "$@" \
	</dev/null >/run/lvbackup-out 2>/run/lvbackup-err
rc=$?
# Wait for the relays (closing the ttys drains them, so all output is out before the marker),
# but not forever: a process the command left behind may still hold the FIFOs open.
(sleep 30; kill $relays) 2>/dev/null &
wait $relays
echo "LVBACKUP-VM-EXIT=$rc" >/dev/console
