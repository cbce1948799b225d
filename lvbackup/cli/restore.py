"""lvbackup restore: plain and instant restores, and the instant restores' --status,
--resume, --cancel, --release (operations/restore.py, operations/instant.py)."""

from __future__ import annotations

import click

from ..operations.groups import restore_group
from ..operations.instant import cancel as cancel_instant
from ..operations.instant import instant_restore
from ..operations.instant import release as release_instant
from ..operations.instant import resume as resume_instant
from ..operations.instant import status as instant_status
from ..operations.restore import RestoreResult, restore_backup
from ..session import Session
from . import App, command, parse_size, pass_app, wait_option
from .render import print_instant


@command()
@click.argument("backup_id", required=False)
@click.option("--to", metavar="VG/LV|DEVICE",
              help="An existing LV, device or file, at least as large.")
@click.option("--new-volume", metavar="VG/NAME", help="Create this LV and restore into it.")
@click.option("--thin-pool", metavar="POOL", help="With --new-volume: a thin LV in this pool.")
@click.option("--to-file", metavar="PATH|-",
              help="A new image file (an existing one only with --force), or - for standard "
                   "output.")
@click.option("--force", is_flag=True,
              help="Write to a target that is in use; with --to-file, replace an existing "
                   "file (keeping its mode and owner; never one a mounted loop device uses); "
                   "with --cancel, leave an existing LV partly restored.")
@click.option("--instant", is_flag=True,
              help="With --new-volume or --to VG/LV: return at once with a device that reads "
                   "and writes as the restored volume while a background copy fills the LV; "
                   "at the end the device maps the LV itself.")
@click.option("--rate", metavar="SIZE",
              help="With --instant or --resume: copy at most SIZE bytes a second (e.g. 50M).")
@click.option("--status", "status_of", is_flag=False, flag_value="", default=None,
              metavar="[VG/NAME]", help="Show the instant restores (or the one onto VG/NAME).")
@click.option("--resume", "resume_of", metavar="VG/NAME",
              help="Take up the instant restore onto VG/NAME after its helper died "
                   "(killed, or the host rebooted).")
@click.option("--cancel", "cancel_of", metavar="VG/NAME",
              help="Stop the unfinished instant restore onto VG/NAME and undo it (an LV it "
                   "created is removed; an existing one, only with --force, is left partly "
                   "restored).")
@click.option("--group", "group_of", metavar="ID",
              help="Restore every member of this group backup to a new LV, all or nothing.")
@click.option("--release", "release_of", metavar="VG/NAME",
              help="Remove the device of the finished instant restore onto VG/NAME: the LV "
                   "is used under its own name (done by itself once nothing holds it open).")
@wait_option
@pass_app
def restore(app: App, backup_id: str | None, to: str | None, new_volume: str | None,
            thin_pool: str | None, to_file: str | None, force: bool, instant: bool,
            rate: str | None, status_of: str | None, resume_of: str | None,
            cancel_of: str | None, release_of: str | None, group_of: str | None,
            wait: float) -> None:
    """Restore a backup to an LV, a device, a file, or standard output.

    With no target, a new LV restore_backup_<id> is created in the volume's VG. With
    --instant, the restored volume is usable at once (see the user guide's limits).

    \b
    Examples:
      lvbackup restore 3f2a --to vg0/data
      lvbackup restore 3f2a --new-volume vg0/data-copy --thin-pool pool0
      lvbackup restore 3f2a --to-file /srv/restored.img
      lvbackup restore 3f2a --to-file - | ssh host 'dd of=/dev/vg0/data bs=1M'
      mount "$(lvbackup restore 3f2a --new-volume vg0/data --instant)" /srv/data
      lvbackup restore --status vg0/data
      lvbackup restore --resume vg0/data
      lvbackup restore --release vg0/data
      lvbackup restore --cancel vg0/data
      lvbackup restore --group 9c1e
    """
    mode = restore_mode({"backup_id": backup_id, "to": to, "new_volume": new_volume,
                         "thin_pool": thin_pool, "to_file": to_file, "force": force,
                         "instant": instant, "rate": rate, "status_of": status_of,
                         "resume_of": resume_of, "cancel_of": cancel_of,
                         "release_of": release_of, "group_of": group_of})
    if mode == "group_of":
        assert group_of is not None
        app.emit(restore_group(app.session(wait), group_of), lambda g: click.echo("\n".join(
            f"Restored backup {r['backup_id']} to new volume {r['target']}"
            for r in g["restored"])))
        return
    if mode in ("cancel_of", "release_of"):
        _end_instant(app, app.session(wait), cancel_of, release_of, force)
        return
    if mode == "status_of":
        app.emit(instant_status(app.session(wait), status_of or None), print_instant)
        return
    if mode == "resume_of":
        assert resume_of is not None
        info = resume_instant(app.session(wait), resume_of, parse_size(rate) if rate else None)
        app.emit(info, lambda r: click.echo(r["device"]))
        return
    if backup_id is None:
        raise click.UsageError("give the backup to restore (or --status, --resume, --cancel, "
                               "--release)")
    if mode == "instant":
        info = instant_restore(app.session(wait), backup_id, to=to, new_volume=new_volume,
                               thin_pool=thin_pool, force=force,
                               rate=parse_size(rate) if rate else None)
        app.log(f"Restoring backup {info['backup_id']} onto {info['volume']} in the "
                f"background; the volume is {info['device']} now (progress: lvbackup "
                f"restore --status {info['volume']})")
        app.emit(info, lambda r: click.echo(r["device"]))
        return
    if sum(x is not None for x in (to, to_file, new_volume)) > 1:
        raise click.UsageError("give one target: --to, --new-volume or --to-file")
    if thin_pool and not new_volume:
        raise click.UsageError("--thin-pool goes with --new-volume")
    if to_file == "-" and app.as_json:
        raise click.UsageError("--json cannot be combined with --to-file - "
                               "(stdout carries the image)")
    session = app.session(wait)
    with app.progress("restore") as progress:
        result = restore_backup(session, backup_id, to=to, to_file=to_file,
                                new_volume=new_volume, thin_pool=thin_pool, force=force,
                                progress=progress)
    if to_file == "-":
        return

    def human(r: RestoreResult) -> None:
        what = {"volume": "new volume" if r["created"] else "volume",
                "file": "new file" if r["created"] else "file", "device": "device"}
        click.echo(f"Restored backup {r['backup_id']} to {what[r['target_kind']]} "
                   f"{r['target']}")

    app.emit(result, human)


# restore's modes: the option that chooses each (None: a plain restore) and the options it
# takes besides. restore_mode() refuses any other combination, naming the options.
RESTORE_MODES: dict[str | None, frozenset[str]] = {
    None: frozenset({"backup_id", "to", "new_volume", "thin_pool", "to_file", "force"}),
    "instant": frozenset({"backup_id", "to", "new_volume", "thin_pool", "force", "rate"}),
    "status_of": frozenset(),
    "resume_of": frozenset({"rate"}),
    "cancel_of": frozenset({"force"}),
    "release_of": frozenset(),
    "group_of": frozenset(),
}
_RESTORE_FLAGS = {"backup_id": "a backup", "to": "--to", "new_volume": "--new-volume",
                  "thin_pool": "--thin-pool", "to_file": "--to-file", "force": "--force",
                  "instant": "--instant", "rate": "--rate", "status_of": "--status",
                  "resume_of": "--resume", "cancel_of": "--cancel", "release_of": "--release",
                  "group_of": "--group"}


def restore_mode(given: dict[str, object]) -> str | None:
    """The mode the options given choose (RESTORE_MODES); UsageError for any option that
    mode does not take."""
    used = [name for name, value in given.items() if value is not None and value is not False]
    chosen = [name for name in used if name in RESTORE_MODES]
    if len(chosen) > 1:
        raise click.UsageError(" and ".join(_RESTORE_FLAGS[n] for n in chosen)
                               + " exclude each other")
    mode = chosen[0] if chosen else None
    extra = [n for n in used if n != mode and n not in RESTORE_MODES[mode]]
    if extra:
        what = f"restore {_RESTORE_FLAGS[mode]}" if mode else "a plain restore"
        takes = ", ".join(_RESTORE_FLAGS[n] for n in sorted(RESTORE_MODES[mode])) or "nothing"
        raise click.UsageError(f"{what} does not take {', '.join(_RESTORE_FLAGS[n] for n in extra)}"
                               f" (it takes: {takes})")
    return mode


def _end_instant(app: App, session: Session, cancel_of: str | None, release_of: str | None,
                 force: bool) -> None:
    """restore --release VG/NAME, restore --cancel VG/NAME [--force]."""
    if release_of is not None:
        info = release_instant(session, release_of)
        app.emit(info, lambda r: click.echo(f"/dev/{r['volume']}"))
        return
    assert cancel_of is not None
    done = cancel_instant(session, cancel_of, force=force)
    if done["partly_restored"]:
        app.warn(f"{done['volume']} is left partly restored: {done['hydrated_bytes']} of "
                 f"{done['total_bytes']} bytes hold backup {done['backup_id']}'s data (and "
                 "the writes made through the device), the rest what it held before")
    app.emit(done, lambda r: click.echo(
        f"Cancelled the instant restore of backup {r['backup_id']} onto {r['volume']}"
        + ("; removed the volume it had created" if r["volume_removed"] else "")))
