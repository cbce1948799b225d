#!/usr/bin/env python3
"""Build and boot the lvbackup test VM (see README.md in this directory).

    vm.py build [--force]     build kernel + initramfs into the cache (no-op if complete)
    vm.py run -- CMD [ARGS]   boot the guest, run CMD in the checkout, exit with its status

Only the standard library is used, so the host's plain python3 is enough.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import gzip
import hashlib
import json
import lzma
import os
import re
import selectors
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHECKOUT = HERE.parent.parent
CACHE = Path(os.environ.get("LVBACKUP_VM_CACHE") or Path.home() / ".cache" / "lvbackup-vm")

# Modules the guest needs (their dependencies are added automatically).
# crc32c_generic is listed explicitly: libcrc32c (dm-persistent-data) and ext4 only
# ask for the "crc32c" crypto algorithm at run time, which no modprobe could resolve here.
MODULES = [
    "virtio_pci", "virtio_blk", "9pnet_virtio", "9p", "overlay", "loop", "ext4",
    "crc32c_generic", "xfs", "dm_mod", "dm_bufio", "dm_bio_prison", "dm_persistent_data",
    "dm_snapshot", "dm_thin_pool", "nbd",
]

# Stage 1, the initramfs /init (busybox sh). It only loads modules and assembles the root:
# host / over 9p (read-only) + tmpfs overlay, then chroots into stage 2, which comes from
# the per-run directory so that it can change without rebuilding the initramfs.
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "lvbackup-vm: init: $*" >/dev/console; sync; poweroff -f; sleep 60; }
mount -t proc proc /proc && mount -t sysfs sysfs /sys && mount -t devtmpfs devtmpfs /dev || fail "base mounts"
while read -r m; do insmod "/lib/modules/$m" || fail "insmod $m"; done </lib/modules/load-order
ip link set lo up
ninep="trans=virtio,version=9p2000.L,msize=512000"
mount -t 9p -o "$ninep,ro,cache=loose" hostroot /mnt/lower || fail "mount host root (9p)"
mount -t tmpfs -o mode=0755 tmpfs /mnt/rw && mkdir /mnt/rw/upper /mnt/rw/work || fail "tmpfs"
mount -t overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work overlay /newroot || fail "overlay"
cd /newroot || fail "cd /newroot"
mount -t proc proc proc && mount -t sysfs sysfs sys && mount -t devtmpfs devtmpfs dev || fail "chroot mounts"
mkdir -p dev/pts dev/shm && mount -t devpts devpts dev/pts && mount -t tmpfs tmpfs dev/shm || fail "dev mounts"
mount -t tmpfs -o mode=0755 tmpfs run && mount -t tmpfs -o mode=1777 tmpfs tmp || fail "run/tmp mounts"
mkdir -p run/lvbackup-vm && mount -t 9p -o "$ninep,cache=none" rundir run/lvbackup-vm || fail "mount run dir (9p)"
chroot /newroot /bin/sh /run/lvbackup-vm/stage2
echo "lvbackup-vm: stage 2 exited with status $?" >/dev/console
sync
poweroff -f
"""  # noqa: E501 - shell lines; any change to INIT also rebuilds the cached guest

# Bump to force a rebuild when the build logic changes in a way MODULES/INIT do not show.
BUILD_FORMAT = 1

EXIT_MARKER = re.compile(rb"^LVBACKUP-VM-EXIT=(\d+)\r?$")


def log(msg: str) -> None:
    print(f"lvbackup-vm: {msg}", file=sys.stderr, flush=True)


class VMError(Exception):
    pass


# ---------------------------------------------------------------- build


def recipe_hash(kernel_pkg: str) -> str:
    recipe = json.dumps([BUILD_FORMAT, kernel_pkg, MODULES, INIT])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def check(argv: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    """Run argv; on failure raise VMError naming the step and showing its output."""
    try:
        p = subprocess.run(argv, capture_output=True, text=True, **kw)
    except OSError as e:
        raise VMError(f"{what}: cannot run {argv[0]}: {e}") from e
    if p.returncode != 0:
        raise VMError(f"{what} failed ({shlex.join(argv)}, exit {p.returncode}):\n"
                      f"{p.stdout}{p.stderr}")
    return p


def apt(argv: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    """Run an apt command; if it fails and we are root, `apt-get update` once and retry
    (fresh CI machines often have the packages installed but no package lists)."""
    try:
        return check(argv, what, **kw)
    except VMError:
        if os.geteuid() != 0:
            raise
    log(f"{what} failed; running apt-get update and retrying")
    check(["apt-get", "update", "-qq"], "apt-get update")
    return check(argv, what, **kw)


def resolve_kernel_pkg() -> str:
    pkg = os.environ.get("LVBACKUP_VM_KERNEL_PKG")
    if pkg:
        return pkg
    out = apt(["apt-cache", "depends", "linux-image-amd64"],
              "finding the guest kernel package").stdout
    m = re.search(r"Depends:\s*(linux-image-[0-9][^\s]*)", out)
    if not m:
        raise VMError("no linux-image-<version> dependency in "
                      f"`apt-cache depends linux-image-amd64`:\n{out}")
    return m.group(1)


def download_deb(pkg: str) -> Path:
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{pkg}_*.deb"))
    if found:
        return found[-1]
    log(f"downloading {pkg}")
    with tempfile.TemporaryDirectory(dir=debs) as tmp:
        argv = ["apt-get", "download", "-q"]
        if os.geteuid() == 0:  # apt's _apt sandbox user cannot write into our directory
            argv += ["-o", "APT::Sandbox::User=root"]
        apt(argv + [pkg], f"downloading {pkg}", cwd=tmp)
        got = list(Path(tmp).glob("*.deb"))
        if len(got) != 1:
            raise VMError(f"apt-get download {pkg} produced {got}")
        return Path(shutil.move(str(got[0]), debs / got[0].name))


def extract_vmlinux(vmlinuz: Path) -> bytes:
    """The kernel ELF inside a bzImage: boot it directly, skipping the decompressor (slow
    under TCG)."""
    data = vmlinuz.read_bytes()
    at = data.find(b"\xfd7zXZ\x00")
    if at < 0:
        raise VMError(f"{vmlinuz}: no XZ payload found (only XZ-compressed kernels are supported)")
    elf = lzma.LZMADecompressor().decompress(data[at:])
    if elf[:4] != b"\x7fELF":
        raise VMError(f"{vmlinuz}: the XZ payload is not an ELF kernel")
    return elf


def read_module(path: Path) -> bytes:
    """Module bytes, decompressed (the initramfs has no decompressing insmod)."""
    name = path.name
    if name.endswith(".ko"):
        return path.read_bytes()
    if name.endswith(".ko.xz"):
        return lzma.decompress(path.read_bytes())
    if name.endswith(".ko.gz"):
        return gzip.decompress(path.read_bytes())
    if name.endswith(".ko.zst"):
        return check(["zstd", "-dc", str(path)], f"decompressing {path}", text=False).stdout
    raise VMError(f"unknown module format: {path}")


def modinfo(ko: bytes) -> dict[str, str]:
    """The key=value strings of an ELF64 module's .modinfo section (what modinfo(8) shows)."""
    shoff = struct.unpack_from("<Q", ko, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, bytes]:
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", ko,
                                                                   shoff + i * shentsize)
        return name, ko[off:off + size]

    names = section(shstrndx)[1]
    for i in range(shnum):
        name_off, content = section(i)
        if names[name_off:names.index(b"\0", name_off)] == b".modinfo":
            info = {}
            for item in content.split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, value)
            return info
    raise VMError("module has no .modinfo section")


def resolve_modules(moddir: Path) -> list[tuple[str, bytes]]:
    """MODULES plus their dependencies, dependencies first, as (file name, bytes).

    The .deb ships no modules.dep (depmod makes it at install time), so the same
    information is read from each module's own `depends=` field."""
    files = {}
    for p in moddir.rglob("*.ko*"):
        files[re.sub(r"\.ko(\.\w+)?$", "", p.name).replace("-", "_")] = p
    order: list[tuple[str, bytes]] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in done:
            return
        if name in chain:
            raise VMError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in files:
            raise VMError(f"module {name} not found in {moddir} "
                          f"(needed by {' -> '.join(chain) or 'MODULES'})")
        ko = read_module(files[name])
        for dep in filter(None, modinfo(ko).get("depends", "").split(",")):
            visit(dep, chain + (name,))
        done.add(name)
        order.append((f"{name}.ko", ko))

    for m in MODULES:
        visit(m, ())
    return order


def cpio(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """A newc cpio archive of (path, mode, data, rdev) written directly, so no root or cpio(1)
    is needed."""
    out = bytearray()

    def add(ino: int, path: str, mode: int, data: bytes, rdev: int) -> None:
        name = path.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev),
                  len(name), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + name)
        out.extend(b"\0" * (-len(out) % 4) + data)
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (path, mode, data, rdev) in enumerate(entries, 1):
        add(ino, path, mode, data, rdev)
    add(0, "TRAILER!!!", 0, b"", 0)
    return bytes(out)


def has_interpreter(elf: bytes) -> bool:
    """True for a dynamically linked ELF64 (it has a PT_INTERP program header)."""
    phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    return any(struct.unpack_from("<I", elf, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def make_initramfs(modules: list[tuple[str, bytes]]) -> bytes:
    busybox = Path(shutil.which("busybox") or "/bin/busybox")
    if not busybox.exists():
        raise VMError("busybox not found: install the busybox-static package")
    if has_interpreter(busybox.read_bytes()):
        raise VMError(f"{busybox} is dynamically linked: install busybox-static")
    d, f = 0o040755, 0o100755
    entries = [(p, d, b"", 0) for p in ("bin", "dev", "proc", "sys", "mnt", "mnt/lower", "mnt/rw",
                                         "newroot", "lib", "lib/modules")]
    entries += [("dev/console", 0o020600, b"", os.makedev(5, 1)),
                ("bin/busybox", f, busybox.read_bytes(), 0),
                ("init", f, INIT.encode(), 0),
                ("lib/modules/load-order", 0o100644,
                 "".join(n + "\n" for n, _ in modules).encode(), 0)]
    entries += [(f"lib/modules/{n}", 0o100644, ko, 0) for n, ko in modules]
    return cpio(entries)


class CacheLock:
    """Exclusive lock on the cache while building or choosing the guest files."""

    def __enter__(self):
        CACHE.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(CACHE / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another build/run to release {CACHE / 'lock'}")
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def current_guest() -> Path | None:
    """The published guest directory if it is complete and matches this recipe."""
    cur = CACHE / "current"
    try:
        manifest = json.loads((cur / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    wanted = os.environ.get("LVBACKUP_VM_KERNEL_PKG") or manifest.get("kernel_pkg", "")
    if manifest.get("recipe") != recipe_hash(wanted):
        return None
    if not all((cur / f).is_file() for f in ("vmlinux", "initramfs.cpio")):
        return None
    return cur.resolve()


def build(force: bool = False) -> Path:
    """Return the guest directory (vmlinux, initramfs.cpio, manifest.json), building it if needed.

    Call with the CacheLock held. Builds go to a temporary directory that is renamed into
    place, and `current` is a symlink switched atomically, so an interrupted build leaves
    nothing half-done behind."""
    if not force and (guest := current_guest()):
        return guest
    t0 = time.monotonic()
    pkg = resolve_kernel_pkg()
    deb = download_deb(pkg)
    log(f"building the guest from {deb.name} into {CACHE}")
    work = Path(tempfile.mkdtemp(prefix="build-", dir=CACHE))
    try:
        check(["dpkg-deb", "-x", str(deb), str(work / "pkg")], f"unpacking {deb.name}")
        vmlinuz = glob.glob(str(work / "pkg/boot/vmlinuz-*"))
        moddirs = glob.glob(str(work / "pkg/lib/modules/*/"))
        if len(vmlinuz) != 1 or len(moddirs) != 1:
            raise VMError(f"{deb.name}: expected one boot/vmlinuz-* and one lib/modules/*/, "
                          f"got {vmlinuz} {moddirs}")
        out = work / "guest"
        out.mkdir()
        (out / "vmlinux").write_bytes(extract_vmlinux(Path(vmlinuz[0])))
        modules = resolve_modules(Path(moddirs[0]))
        (out / "initramfs.cpio").write_bytes(make_initramfs(modules))
        manifest = {"kernel_pkg": pkg, "deb": deb.name, "kernel_release": Path(moddirs[0]).name,
                    "recipe": recipe_hash(pkg), "modules": [n for n, _ in modules],
                    "built": time.strftime("%Y-%m-%d %H:%M:%S")}
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        final = CACHE / f"guest-{Path(moddirs[0]).name}-{manifest['recipe']}"
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
        link = CACHE / f"current.{os.getpid()}"
        link.unlink(missing_ok=True)
        link.symlink_to(final.name)
        link.rename(CACHE / "current")
        # Old guests are unused now: a running VM has its files open (see run()).
        for old in CACHE.glob("guest-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"guest built in {time.monotonic() - t0:.1f}s ({len(modules)} modules, "
        f"kernel {manifest['kernel_release']})")
    return final


# ---------------------------------------------------------------- run

# Stage 2 is copied into the run directory for each run; see stage2.sh.
STAGE2 = HERE / "stage2.sh"


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise VMError(f"{name}={value!r} is not an integer") from None


def guest_env() -> dict[str, str]:
    """Host variables the guest command should see (it starts from an empty environment)."""
    env = {k: v for k, v in os.environ.items()
           if k.startswith("LVBACKUP_") or k in ("HOME", "LANG", "LC_ALL", "PYTEST_ADDOPTS", "CI",
                                                  "PY_COLORS", "NO_COLOR", "COLUMNS")}
    # Same PATH as the host (same root filesystem), plus the sbin directories lvm2 lives in.
    path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(":")
    env["PATH"] = ":".join(path + [d for d in ("/usr/local/sbin", "/usr/sbin", "/sbin")
                                   if d not in path])
    env.setdefault("LANG", "C.UTF-8")
    if sys.stdout.isatty():
        # The guest's stdout is a pipe; keep pytest's colours and width when a human watches.
        env.setdefault("PY_COLORS", "1")
        env.setdefault("COLUMNS", str(shutil.get_terminal_size().columns))
    env["LVBACKUP_IN_VM"] = "1"
    return env


def qpath(path: Path | str) -> str:
    """A path inside a qemu -option value, where a comma must be doubled."""
    return str(path).replace(",", ",,")


def qemu_argv(kernel_fd: int, initrd_fd: int, rundir: Path, fds: dict[str, int]) -> list[str]:
    # TCG by default: /dev/kvm on the machines this was made on does not work.
    accel = os.environ.get("LVBACKUP_VM_ACCEL", "tcg")
    cpu = "host" if accel == "kvm" else "max"
    if accel == "tcg":
        accel = "tcg,thread=multi"
    ninep = "security_model=none,multidevs=remap"
    cmdline = ("console=ttyS0 quiet panic=-1 mitigations=off random.trust_cpu=on tsc=reliable "
               "8250.nr_uarts=3 i8042.noaux i8042.nokbd i8042.nopnp")
    argv = [
        "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-M", "q35", "-accel", accel, "-cpu", cpu,
        "-smp", str(env_int("LVBACKUP_VM_CPUS", 2)), "-m", os.environ.get("LVBACKUP_VM_MEM", "3G"),
        # /dev/fd/N: the files stay valid even if a concurrent rebuild replaces the cache.
        "-kernel", f"/dev/fd/{kernel_fd}", "-initrd", f"/dev/fd/{initrd_fd}", "-append", cmdline,
        "-virtfs", f"local,path=/,mount_tag=hostroot,readonly=on,{ninep}",
        "-virtfs", f"local,path={qpath(CHECKOUT)},mount_tag=checkout,{ninep}",
        "-virtfs", f"local,path={qpath(rundir)},mount_tag=rundir,{ninep}",
        "-drive",
        f"file={qpath(rundir / 'data.img')},format=raw,if=virtio,cache=unsafe,discard=unmap",
        "-device", "virtio-rng-pci",
    ]
    # ttyS0 = kernel console (+ exit marker), ttyS1/ttyS2 = the command's stdout/stderr.
    for name in ("console", "stdout", "stderr"):
        argv += ["-chardev", f"file,id={name},path=/dev/fd/{fds[name]},append=on",
                 "-serial", f"chardev:{name}"]
    # Extra options for experiments, e.g. "-cpu Haswell" (qemu lets the last -cpu/-smp/-m win).
    return argv + shlex.split(os.environ.get("LVBACKUP_VM_QEMU_OPTS", ""))


def make_data_disk(path: Path) -> None:
    """A sparse per-run disk with an ext4 made on the host (much faster than in the guest)."""
    size = os.environ.get("LVBACKUP_VM_DISK_SIZE", "32G")
    check(["truncate", "-s", size, str(path)], "creating the data disk")
    check(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E", "lazy_itable_init=1,nodiscard",
           "-L", "lvbackup-data", str(path)], "formatting the data disk")


def run(argv: list[str]) -> int:
    timeout = env_int("LVBACKUP_VM_TIMEOUT", 3600)
    verbose = os.environ.get("LVBACKUP_VM_VERBOSE") == "1"
    if not shutil.which("qemu-system-x86_64"):
        raise VMError("qemu-system-x86_64 not found: install qemu-system-x86 (scripts/setup.sh)")
    with CacheLock():
        guest = build()
        kernel_fd = os.open(guest / "vmlinux", os.O_RDONLY)
        initrd_fd = os.open(guest / "initramfs.cpio", os.O_RDONLY)

    rundir = Path(tempfile.mkdtemp(prefix="lvbackup-vm-"))
    qemu = None
    try:
        make_data_disk(rundir / "data.img")
        (rundir / "settings").write_text(f"CHECKOUT={shlex.quote(str(CHECKOUT))}\n")
        assignments = [f"{k}={v}" for k, v in sorted(guest_env().items())]
        (rundir / "cmd").write_text(f"set -- {shlex.join(assignments + argv)}\n")
        shutil.copy(STAGE2, rundir / "stage2")

        pipes = {name: os.pipe() for name in ("console", "stdout", "stderr")}
        fds = {name: w for name, (_, w) in pipes.items()}
        cmd = qemu_argv(kernel_fd, initrd_fd, rundir, fds)
        if verbose:
            log(shlex.join(cmd))
        t0 = time.monotonic()
        try:
            qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    pass_fds=[kernel_fd, initrd_fd, *fds.values()])
        except OSError as e:
            raise VMError(f"cannot start qemu: {e}") from e
        finally:
            for fd in [kernel_fd, initrd_fd, *fds.values()]:
                os.close(fd)

        sinks = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
        sel = selectors.DefaultSelector()
        for name, (r, _) in pipes.items():
            sel.register(r, selectors.EVENT_READ, name)
        console, partial, status = bytearray(), b"", None
        deadline, timed_out, exited_at = t0 + timeout, False, None
        while sel.get_map():
            now = time.monotonic()
            if now > deadline:
                timed_out = True
                break
            if exited_at is None and qemu.poll() is not None:
                exited_at = now
            if exited_at is not None and now > exited_at + 5:
                break  # qemu is gone; don't wait on a pipe that some stray process may hold
            for key, _ in sel.select(timeout=1):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                    os.close(key.fd)
                elif key.data != "console":
                    sinks[key.data].write(data)
                    sinks[key.data].flush()
                else:
                    console += data
                    if verbose:
                        sys.stderr.buffer.write(data)
                        sys.stderr.flush()
                    lines = (partial + data).split(b"\n")
                    partial = lines.pop()
                    for line in lines:
                        if m := EXIT_MARKER.match(line):
                            status = int(m.group(1))
                            deadline = min(deadline, time.monotonic() + 60)  # only poweroff is left
        elapsed = time.monotonic() - t0
        if qemu.poll() is None:
            qemu.kill()
        qemu_rc = qemu.wait()

        if status is None:
            why = (f"timed out after {timeout}s (LVBACKUP_VM_TIMEOUT)" if timed_out
                   else f"qemu exited with status {qemu_rc} after {elapsed:.0f}s")
            last = bytes(console).replace(b"\r", b"").splitlines()[-80:]
            tail = b"\n".join(last).decode(errors="replace")
            raise VMError(f"the guest never reported an exit status: {why}.\n"
                          f"--- guest console (last 80 lines) ---\n{tail}\n"
                          "--- end of guest console ---")
        if verbose:
            log(f"guest command exited with status {status} ({elapsed:.1f}s in the VM)")
        return status
    finally:
        if qemu and qemu.poll() is None:
            qemu.kill()
            qemu.wait()
        shutil.rmtree(rundir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="build the guest kernel + initramfs into the cache")
    b.add_argument("--force", action="store_true", help="rebuild even if the cache is complete")
    r = sub.add_parser("run", help="boot the guest and run a command in the checkout")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    args = parser.parse_args()

    # Turn SIGTERM/SIGHUP into exceptions so that `finally` kills qemu and removes the run dir.
    def terminate(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)

    try:
        if args.action == "build":
            with CacheLock():
                guest = build(force=args.force)
            print(guest)
            return 0
        cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
        if not cmd:
            print("usage: tests/vm/run -- CMD [ARGS...]", file=sys.stderr)
            return 2
        return run(cmd)
    except VMError as e:
        log(f"error: {e}")
        return 125 if args.action == "run" else 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
