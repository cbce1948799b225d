"""Fixtures for tests that need real lvm2 and device-mapper.

These tests run inside the test VM (tests/vm/run-lvm-tests), which sets LVBACKUP_IN_VM=1.
Every test in this directory is marked `lvm`; the ordinary suite deselects them with
`-m "not lvm"`, and one that runs anyway outside the VM fails (it never skips silently).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

# Settings the guest's lvm.conf already has; passed on the command line too so that the
# helpers also behave on a machine with its own lvm.conf. (--config may appear only once.)
LVM_CONFIG = "backup{backup=0 archive=0} activation{udev_sync=0 udev_rules=0 monitoring=0}"

VG_SIZE = 4 << 30  # sparse: only what the test writes takes space on the VM's data disk


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.lvm)


@pytest.fixture(autouse=True)
def _inside_vm():
    if os.environ.get("LVBACKUP_IN_VM") != "1":
        pytest.fail("this test needs real lvm2/device-mapper and runs only inside the test VM: "
                    "use tests/vm/run-lvm-tests (LVBACKUP_IN_VM=1 is not set)", pytrace=False)


def run(argv: list[str | Path], *, check: bool = True, timeout: float | None = None) -> str:
    """Run argv and return its stdout; a failure shows the command and its stderr."""
    p = subprocess.run([str(a) for a in argv], capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {p.returncode}:\n"
                             f"{p.stderr.decode(errors='replace')}{p.stdout.decode(errors='replace')}")
    return p.stdout.decode(errors="replace")


def lvm_size(size: int | str) -> str:
    """LVM size argument: ints are bytes, strings pass through ("64m", "1g")."""
    return f"{size}b" if isinstance(size, int) else size


class VolumeGroup:
    """A throwaway VG on a loop device; LV arguments are names within this VG."""

    def __init__(self, name: str, pv: str):
        self.name = name
        self.pv = pv

    def lvm(self, *args: str | Path) -> str:
        """Run an LVM command (`lvcreate`, `lvs`, ...) and return its stdout."""
        args = [str(a) for a in args]
        if not any(a == "--config" or a.startswith("--config=") for a in args):
            args[1:1] = ["--config", LVM_CONFIG]
        return run(args)

    def path(self, lv: str) -> str:
        return f"/dev/{self.name}/{lv}"

    def dm_name(self, lv: str) -> str:
        """The device-mapper name of an LV or sub-LV (`pool_tmeta`): hyphens doubled."""
        return f"{self.name.replace('-', '--')}-{lv.replace('-', '--')}"

    def create_lv(self, name: str, size: int | str) -> str:
        self.lvm("lvcreate", "-q", "-y", "-W", "y", "-n", name, "-L", lvm_size(size), self.name)
        return self.path(name)

    def create_thin_pool(self, name: str, size: int | str) -> str:
        self.lvm("lvcreate", "-q", "-y", "--type", "thin-pool", "-n", name, "-L", lvm_size(size),
                 self.name)
        return self.path(name)

    def create_thin_lv(self, name: str, virtual_size: int | str, pool: str) -> str:
        self.lvm("lvcreate", "-q", "-y", "--type", "thin", "-n", name, "-V", lvm_size(virtual_size),
                 "--thinpool", pool, self.name)
        return self.path(name)

    def snapshot(self, origin: str, name: str, size: int | str | None = None) -> str:
        """A classic (COW) snapshot if size is given, else a thin snapshot (created inactive,
        with activation skip, as lvm2 does; see activate())."""
        cmd = ["lvcreate", "-q", "-y", "-s", "-n", name]
        if size is not None:
            cmd += ["-L", lvm_size(size)]
        self.lvm(*cmd, f"{self.name}/{origin}")
        return self.path(name)

    def activate(self, lv: str) -> str:
        """Activate an LV, even one flagged activation-skip (thin snapshots)."""
        self.lvm("lvchange", "-ay", "-K", f"{self.name}/{lv}")
        return self.path(lv)

    def write(self, lv: str, data: bytes, offset: int = 0) -> None:
        """Write data into an LV at offset and flush it to the device."""
        fd = os.open(self.path(lv), os.O_WRONLY)
        try:
            assert os.pwrite(fd, data, offset) == len(data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read(self, lv: str, length: int | None = None, offset: int = 0) -> bytes:
        """Bytes of an LV (all of it by default)."""
        with open(self.path(lv), "rb") as f:
            f.seek(offset)
            return f.read() if length is None else f.read(length)

    def lvs(self, *fields: str) -> list[dict[str, str]]:
        """`lvs` rows of this VG (hidden sub-LVs too) as dicts; lvm2 reports every value as a
        string."""
        opts = ["-o", ",".join(("lv_name", "lv_attr", "lv_size", "origin", "pool_lv") + fields)]
        out = self.lvm("lvs", "-a", "--reportformat", "json", "--units", "b", "--nosuffix", *opts,
                       self.name)
        return [row for report in json.loads(out)["report"] for row in report["lv"]]

    def lv(self, name: str, *fields: str) -> dict[str, str]:
        """The `lvs` row of one LV."""
        rows = [r for r in self.lvs(*fields) if r["lv_name"] == name]
        assert len(rows) == 1, f"no LV {name} in {self.name}: {self.lvs()}"
        return rows[0]


@contextmanager
def throwaway_vg(directory: Path, prefix: str, size: int) -> Iterator[VolumeGroup]:
    """A VG with a unique name on a loop device over a sparse file in `directory`;
    removed afterwards, even after a failure."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    backing = directory / f"{name}.pv"
    with open(backing, "wb") as f:
        f.truncate(size)
    loop = run(["losetup", "--find", "--show", backing]).strip()
    group = VolumeGroup(name, loop)
    created = False
    try:
        group.lvm("vgcreate", "-q", "-y", name, loop)
        created = True
        yield group
    finally:
        teardown_vg(group, backing, created)


@pytest.fixture
def vg(tmp_path) -> Iterator[VolumeGroup]:
    """A fresh VG for one test."""
    with throwaway_vg(tmp_path, "lvbt", VG_SIZE) as group:
        yield group


def teardown_vg(group: VolumeGroup, backing: Path, created: bool) -> None:
    """Remove the VG and its loop device, even after a failed test; fail the test if that
    does not work. An LV still open (a leaked file descriptor) keeps its devices: they are
    left alone rather than forced away (which can hang), and their unique names keep them
    out of later tests' way."""
    errors = []
    for step, argv in ((created, ["vgremove", "-q", "-ff", "-y", group.name]),
                       (True, ["losetup", "-d", group.pv])):  # a busy loop device just autoclears
        if step:
            try:
                run(argv, timeout=120)
            except (AssertionError, subprocess.TimeoutExpired) as e:
                errors.append(str(e))
    backing.unlink(missing_ok=True)
    if errors:
        left = run(["dmsetup", "ls"], check=False)
        pytest.fail(f"cleaning up VG {group.name}:\n" + "\n".join(errors)
                    + f"\ndm devices left:\n{left}", pytrace=False)


class Lvbackup:
    """Runs the installed `lvbackup` command with a per-test config file."""

    def __init__(self, config: Path):
        self.config = config
        self.exe = Path(sys.executable).parent / "lvbackup"

    def __call__(self, *args: str | Path, check: bool = True, input: bytes | None = None
                 ) -> subprocess.CompletedProcess:
        if not self.exe.exists():
            pytest.fail(f"{self.exe} not found: install the project into the venv "
                        "(scripts/setup.sh)", pytrace=False)
        argv = [str(self.exe), "--config", str(self.config), *map(str, args)]
        # lvbackup honours LVBACKUP_* overrides; only the config file should count here.
        env = {k: v for k, v in os.environ.items() if not k.startswith("LVBACKUP_")}
        p = subprocess.run(argv, input=input, capture_output=True, env=env)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {p.returncode}:\n"
                                 f"{p.stderr.decode(errors='replace')}{p.stdout.decode(errors='replace')}")
        return p

    def json(self, *args: str | Path):
        """Run `lvbackup --json ARGS` (must succeed) and return its parsed output."""
        p = self("--json", *args)
        try:
            return json.loads(p.stdout)
        except ValueError:
            raise AssertionError(f"lvbackup --json {' '.join(map(str, args))}: not JSON:\n"
                                 f"{p.stdout.decode(errors='replace')}") from None


@pytest.fixture
def lvb(tmp_path) -> Lvbackup:
    """`lvb(*args, check=True)` runs `lvbackup --config <per-test config> ARGS`;
    `lvb.json(*args)` adds `--json` and parses the output. The repository and catalog
    live under the test's tmp_path."""
    config = tmp_path / "lvbackup.yaml"
    # JSON-quoted strings are valid YAML scalars, whatever the path contains.
    config.write_text(f"repository: {json.dumps(str(tmp_path / 'repo'))}\n"
                      f"catalog: {json.dumps(str(tmp_path / 'catalog.db'))}\n")
    return Lvbackup(config)
