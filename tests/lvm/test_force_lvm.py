"""In-use volumes (docs/lineage.md, rule 3): refused without --force; with --force read
through a temporary snapshot (classic for a linear LV, thin for a thin LV) that never
outlives the run: not after success, not after a failure to create it, not after SIGTERM
or SIGINT (even one that arrives while lvcreate runs, which must not be killed halfway);
after SIGKILL the next run removes it and turns the dead run's row to `error`.

Both volumes are held open by a `sleep` process for the whole module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from types import SimpleNamespace

import pytest

from lvbhelpers import (
    Lvb,
    MiB,
    assert_refused,
    children,
    held_open,
    info,
    mixed,
    module_vg,
    ok_json,
    sha,
    temp_snapshots,
    wait_for_rows,
)

pytestmark = pytest.mark.lvm

SIZE = 32 * MiB
NAMES = ("lin", "thin")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("force")
    lvb = Lvb(tmp / "lvb", workers=1)
    init = lvb.start("init")
    with module_vg(tmp) as vg:
        vg.create_lv("lin", SIZE)
        vg.create_thin_pool("pool", 128 * MiB)
        vg.create_thin_lv("thin", SIZE, "pool")
        content = {name: mixed(SIZE, name.encode()) for name in NAMES}
        for name, data in content.items():
            vg.write(name, data)
        out, err = init.communicate(timeout=120)
        assert init.returncode == 0, err
        with held_open(vg.path("lin")), held_open(vg.path("thin")):
            lvs = {r["lv_name"]: r for r in vg.lvs("lv_uuid")}
            assert lvs["lin"]["lv_attr"][5] == lvs["thin"]["lv_attr"][5] == "o", lvs
            yield SimpleNamespace(vg=vg, lvb=lvb, tmp=tmp, content=content, lvs=lvs,
                                  names=sorted(lvs))


def vol(site, name: str) -> str:
    return f"{site.vg.name}/{name}"


def lv_names(vg) -> list[str]:
    return sorted(r["lv_name"] for r in vg.lvs())


def test_in_use_volumes(site, tmp_path):
    vg, lvb = site.vg, site.lvb
    forced = dict(zip(NAMES, lvb.parallel(*[("--json", "create", "--volume", vol(site, n),
                                             "--force") for n in NAMES]), strict=True))
    recs = {n: ok_json(p) for n, p in forced.items()}
    assert temp_snapshots(vg) == [] and lv_names(vg) == site.names

    unforced, *restored = lvb.parallel(
        ("create", "--volume", vol(site, "lin")),
        *[("restore", recs[n]["id"], "--to-file", tmp_path / n) for n in NAMES])
    assert_refused(unforced, "Backing up an in-use volume must use the force flag.")
    for p in restored:
        assert p.returncode == 0, p.stderr

    for name, rec in recs.items():
        assert rec["status"] == "available", rec
        assert rec["volume_id"] == site.lvs[name]["lv_uuid"], rec
        assert rec["volume_name"] == vol(site, name), rec
        assert rec["snapshot_id"] is None and rec["snapshot_name"] is None, rec
        # data_timestamp is the temporary snapshot's lv_time (whole seconds), taken after
        # the row was created (created_at) and before the backup ended (updated_at)
        assert rec["data_timestamp"].endswith(".000000+00:00"), rec
        assert rec["created_at"][:19] <= rec["data_timestamp"][:19] <= rec["updated_at"], rec
        assert sha((tmp_path / name).read_bytes()) == sha(site.content[name]), name
    assert [r["status"] for r in lvb.rows()] == ["available", "available"]
    assert vg.lv("lin")["lv_attr"][5] == "o"


# --- a volume group without room for a classic temporary snapshot ------------------------

@pytest.fixture(scope="module")
def no_space(site):
    """`create --volume lin --force` while the VG has no free extent at all."""
    vg, lvb = site.vg, site.lvb
    vg.lvm("lvcreate", "-q", "-y", "-W", "n", "-Z", "n", "-n", "filler", "-l", "100%FREE", vg.name)
    try:
        before = {r["id"] for r in lvb.rows()}
        p = lvb("create", "--volume", vol(site, "lin"), "--force", check=False)
        names = lv_names(vg)
        new_rows = [r for r in lvb.rows() if r["id"] not in before]
    finally:
        vg.lvm("lvremove", "-q", "-y", f"{vg.name}/filler")
    return SimpleNamespace(proc=p, names=names, rows=new_rows)


def test_no_space_for_temporary_snapshot(site, no_space):
    line = assert_refused(no_space.proc, f"volume group {site.vg.name} lacks the free space "
                                         "for a temporary snapshot", code=1)
    assert "temp_snapshot_size" in line
    assert no_space.names == sorted(site.names + ["filler"])  # no snapshot left behind


def test_no_space_leaves_an_error_row(no_space):
    assert [r["status"] for r in no_space.rows] == ["error"], no_space.rows
    assert "free space" in no_space.rows[0]["fail_reason"]


# --- signals -----------------------------------------------------------------------------

def test_sigterm_and_sigint_remove_the_temporary_snapshot(site):
    """SIGTERM during a backup through a classic temporary snapshot, SIGINT during one
    through a thin temporary snapshot (both at once): each snapshot is removed, each row
    ends `error`."""
    vg, lvb = site.vg, site.lvb
    procs = {name: lvb.start("--json", "create", "--volume", vol(site, name), "--force")
             for name in NAMES}
    rows = wait_for_rows(lvb, procs, "creating", freeze=True)
    temps = {r["origin"]: r for r in vg.lvs("lv_tags", "segtype")
             if "lvbackup_temp" in r["lv_tags"].split(",")}
    assert temps.keys() == {"lin", "thin"}, temps
    assert temps["lin"]["lv_attr"][0] == "s", temps  # classic for the linear volume
    assert temps["thin"]["segtype"] == "thin" and temps["thin"]["pool_lv"] == "pool", temps
    signals = {"lin": (signal.SIGTERM, 143), "thin": (signal.SIGINT, 130)}
    for name, (sig, _) in signals.items():
        procs[name].send_signal(sig)
        procs[name].send_signal(signal.SIGCONT)
    for name, (_, code) in signals.items():
        out, err = procs[name].communicate(timeout=120)
        assert procs[name].returncode == code, (name, procs[name].returncode, err)
        lines = [ln for ln in err.decode().splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in err.decode(), err
        row = lvb.row(rows[name]["id"])
        assert row["status"] == "error" and row["fail_reason"], row
    assert temp_snapshots(vg) == [] and lv_names(vg) == site.names


def test_sigkill_leftover_is_removed_by_the_next_run(site):
    vg, lvb = site.vg, site.lvb
    p = lvb.start("--json", "create", "--volume", vol(site, "lin"), "--force")
    row = wait_for_rows(lvb, {"lin": p}, "creating", freeze=True)["lin"]
    p.kill()
    p.wait()
    left = temp_snapshots(vg)
    assert len(left) == 1, left
    tags = info(vg, left[0])["lv_tags"].split(",")
    assert "lvbackup_temp" in tags and f"lvbackup_run_{row['id']}" in tags, tags
    assert lvb.row(row["id"])["status"] == "creating"

    rec = lvb.json("create", "--volume", vol(site, "lin"), "--force")
    assert rec["status"] == "available"
    assert temp_snapshots(vg) == [] and lv_names(vg) == site.names
    dead = lvb.row(row["id"])
    assert dead["status"] == "error" and "interrupted" in dead["fail_reason"], dead


def test_signal_while_lvm_creates_the_temporary_snapshot(site):
    """SIGTERM while lvcreate runs: LVM is never killed halfway (it may have the origin
    suspended); lvbackup waits for it, then removes the new snapshot. lvcreate is held
    stopped for a second after the SIGTERM to see that it is left alone."""
    vg, lvb = site.vg, site.lvb
    p = lvb.start("create", "--volume", vol(site, "lin"), "--force")
    deadline = time.monotonic() + 120
    while not (kids := children(p.pid, "lvcreate")):
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.005)
    os.kill(kids[0], signal.SIGSTOP)
    try:
        p.send_signal(signal.SIGTERM)
        time.sleep(1)
        survived = process_state(kids[0]) not in (None, "Z")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(kids[0], signal.SIGCONT)
    assert survived, "lvbackup killed lvcreate when it got SIGTERM"
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err
    assert temp_snapshots(vg) == [] and lv_names(vg) == site.names
    attrs = {r["lv_name"]: r["lv_attr"] for r in vg.lvs()}
    assert attrs["lin"][4] == "a" and attrs["lin"][5] == "o", attrs  # active, not suspended
    assert vg.read("lin", MiB) == site.content["lin"][:MiB]


def process_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]
