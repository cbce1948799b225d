"""The command line: parse, call one operation, render (rich tables, or one JSON document)."""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from typing import Any

import click

from . import __version__, faults, logsetup
from .catalog import STATUSES
from .config import Config, load_config
from .datapath.pipeline import tune_malloc
from .documents import ExportedRecord
from .errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    CorruptionError,
    LvbackupError,
    NotFoundError,
    UsageError,
)
from .labels import parse_labels
from .operations.copy import copy_backups
from .operations.create import create_backup, quiesce_of, select_source
from .operations.delete import delete_backup
from .operations.diff import diff_backups
from .operations.groups import (
    create_group,
    delete_group,
    group_backups,
    one_group,
    restore_group,
)
from .operations.instant import cancel as cancel_instant
from .operations.instant import instant_restore
from .operations.instant import release as release_instant
from .operations.instant import resume as resume_instant
from .operations.instant import status as instant_status
from .operations.inventory import create_snapshot, delete_snapshot, list_snapshots
from .operations.inventory import volumes as list_volumes
from .operations.jobs import run_jobs
from .operations.key import add_key, change_passphrase, export_key, import_key, list_keys
from .operations.maintenance import (
    collect_garbage,
    config_warnings,
    effective_config,
    init_repository,
    rebuild_catalog,
)
from .operations.nbd import map_backup, mapped_backups, mount_backup
from .operations.nbd import unmap as unmap_backup
from .operations.nbd import unmount as unmount_backup
from .operations.prune import prune as prune_backups
from .operations.records import export_record as export_backup_record
from .operations.records import import_record as import_backup_record
from .operations.records import list_backups, set_protected, show_backup
from .operations.restore import RestoreResult, restore_backup
from .operations.verify import verify_backups
from .render import (
    Col,
    count,
    err_console,
    print_group,
    print_instant,
    print_lineage,
    print_lvs,
    print_maps,
    print_record,
    print_records,
    print_table,
    short,
    when,
)
from .retention import Policy
from .session import Session
from .timeutil import parse_duration
from .units import human_size

EXIT_CODES = """\b
Exit status:
  0   success
  1   the operation failed (I/O or network error, full disk, ...)
  2   invalid usage, or a request the current state forbids
  3   damage found in backed-up data (verify, restore, or any command that read it)
  75  the repository or volume is locked by another run (see --wait)
  130 interrupted (Ctrl-C): the work was stopped and cleaned up
  143 terminated (SIGTERM): the work was stopped and cleaned up
  'run' exits with the worst of its jobs' statuses (3 worst, then 2, 1, 75).
With --json a failure's line on stderr is a JSON object: {"error": ..., "exit_code": ...}.
Global options (--config, --json, --quiet, --verbose) go before or after the command.
"""

def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in "KMG" and t[-1:] else ""
    try:
        return int(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 131072, 128K, 1M)") from None


class App:
    """Per-invocation state: global options, the configuration, the open session."""

    def __init__(self, config_path: str | None, as_json: bool, quiet: bool):
        self.config_path = config_path
        self.as_json = as_json
        self.quiet = quiet
        self._config: Config | None = None
        self._session: Session | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def session(self, wait: float = 0.0) -> Session:
        if self._session is None:
            self._session = Session(self.config, wait)
            self._session.warn = self.warn
            click.get_current_context().call_on_close(self._session.close)
        return self._session

    def warn(self, message: str) -> None:
        """One line on stderr (above a progress bar, if one is shown), even with --quiet:
        a failed hook or an unwritable metrics file is worth a cron mail."""
        err_console().print(f"lvbackup: warning: {message}", markup=False, highlight=False,
                          soft_wrap=True)

    def emit(self, data: Any, human: Callable[[Any], None]) -> None:
        """The result: one JSON document with --json (explicit output wins over --quiet),
        nothing with --quiet (cron mails only failures), else `human(data)`."""
        if self.as_json:
            click.echo(json.dumps(data, indent=2))
        elif not self.quiet:
            human(data)

    def log(self, message: str) -> None:
        if not self.quiet:
            click.echo(message, err=True)

    @contextmanager
    def progress(self, label: str) -> Iterator[Callable[..., None] | None]:
        """A progress bar on stderr when it is a terminal and not --quiet (never on stdout):
        bytes done, throughput, ETA and, for a backup, new and stored bytes so far.
        The callback is `update(done, total, stats=None)`."""
        if self.quiet or not sys.stderr.isatty():
            yield None
            return
        from .progressbar import progress_bar
        with progress_bar(label, err_console()) as update:
            yield update


def read_text_input(source: str) -> str:
    """The text of FILE or of standard input ("-"); undecodable text becomes a NUL, which
    every parser refuses."""
    try:
        if source == "-":
            return sys.stdin.read()
        with open(source) as f:
            return f.read(1 << 20)
    except OSError as e:
        raise UsageError(f"cannot read {source}: {e.strerror}") from None
    except UnicodeDecodeError:
        return "\x00"


# The global options, accepted before the command (the group's own options) and after it
# (lvbackup list --json): every command and group below the top carries them too, hidden
# from its --help, which says so in one line instead.
GLOBAL_NOTE = ("The global options --config, --json, --quiet and --verbose may also follow "
               "the command (see lvbackup --help).")


def _set_global(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """A global option given after the command: set on the App (a flag given in both
    places is simply on; two different --config files are refused)."""
    app = ctx.find_object(App)
    if app is None or value in (None, False):
        return
    if param.name == "config_path":
        if app.config_path not in (None, value):
            raise click.UsageError(f"--config given twice: {app.config_path} and {value}")
        app.config_path = value
    elif param.name == "verbose":   # the group's callback, which sets it up, ran already
        logsetup.verbose()
    else:
        setattr(app, str(param.name), True)


def _global_params() -> list[click.Parameter]:
    def hidden(decls: list[str], flag: bool) -> click.Option:
        return click.Option(decls, is_flag=flag, hidden=True, expose_value=False,
                            callback=_set_global)

    return [hidden(["--config", "config_path"], False), hidden(["--json", "as_json"], True),
            hidden(["--quiet", "-q", "quiet"], True),
            hidden(["--verbose", "-v", "verbose"], True)]


class Command(click.Command):
    """A command that also takes the global options after its name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(_global_params())

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        formatter.write_paragraph()
        formatter.write_text(GLOBAL_NOTE)


class Group(click.Group):
    """Reports an LvbackupError as exit_status() does, also when click runs the command
    in standalone mode (tests, shell completion). Its commands and subgroups take the
    global options after their name as well."""

    command_class = Command
    group_class = type   # subgroups are Groups too

    def __init__(self, *args: Any, top: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not top:
            self.params.extend(_global_params())

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        if ctx.parent is not None:
            formatter.write_paragraph()
            formatter.write_text(GLOBAL_NOTE)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LvbackupError as e:
            app = ctx.find_object(App)
            ctx.exit(exit_status(e, as_json=app is not None and app.as_json))


pass_app = click.make_pass_decorator(App)
wait_option = click.option("--wait", type=click.FloatRange(min=0), default=0.0,
                           show_default=True, metavar="SECONDS",
                           help="Wait this long for a lock held by another run, then exit 75.")


@click.group(cls=Group, top=True, epilog=EXIT_CODES,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", metavar="FILE",
              help="Configuration file "
                   "[default: $LVBACKUP_CONFIG, else /etc/lvbackup/lvbackup.yaml]")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document on stdout (docs/json.md); a failure is one JSON "
                   "line on stderr.")
@click.option("--quiet", "-q", is_flag=True,
              help="Print nothing on success (for cron); a failure still prints its line.")
@click.option("--verbose", "-v", is_flag=True, help="Explain more; tracebacks on internal errors.")
@click.version_option(__version__, prog_name="lvbackup")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, as_json: bool, quiet: bool,
        verbose: bool) -> None:
    """Back up LVM logical volumes, their snapshots, and any block device or image file:
    full and incremental, deduplicated, compressed and verifiable.

    \b
    Example:
      lvbackup init
      lvbackup create --device /srv/disk.img
      lvbackup create --device /srv/disk.img --incremental
      lvbackup list
    """
    ctx.obj = App(config_path, as_json, quiet)
    if verbose:
        logsetup.verbose()


label_option = click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
                            help="Only backups with this label (repeatable: all must match).")


# --- commands ------------------------------------------------------------------------------

@cli.command()
@click.option("--block-size", metavar="N", help="Block size of a new repository (e.g. 128K).")
@click.option("--encryption", is_flag=True,
              help="Encrypt a new repository: the passphrase from $LVBACKUP_PASSPHRASE, "
                   "passphrase_file: or passphrase_command:, or key_file: (config).")
@pass_app
def init(app: App, block_size: str | None, encryption: bool) -> None:
    """Create the repository and the catalog (idempotent).

    \b
    Example:
      lvbackup --config /etc/lvbackup/lvbackup.yaml init --block-size 128K
      export LVBACKUP_PASSPHRASE=...    # every later command needs it too
      lvbackup init --encryption
      lvbackup key export --to /root/lvbackup-key.txt
    """
    result = init_repository(app.config, parse_size(block_size) if block_size else None,
                             encryption)

    def human(r: dict) -> None:
        verb = "Created" if r["created"] else "Using existing"
        size = human_size(r["block_size"])
        kind = "encrypted" if r["encrypted"] else "unencrypted"
        click.echo(f"{verb} {kind} repository {r['repository']} (block size {size}),"
                   f" catalog {r['catalog']}")
        if r["created"] and r["encrypted"]:
            click.echo("Back its key up now: 'lvbackup key export' (without the key and "
                       "its passphrase, no backup can be read)")

    app.emit(result, human)


@cli.command()
@click.option("--volume", "volumes", metavar="VG/LV", multiple=True,
              help="Back up an LVM volume (with --group: repeatable, the group's members).")
@click.option("--group", metavar="NAME",
              help="Back up the volumes given as one consistency group: snapshots taken at "
                   "one instant, their filesystems frozen meanwhile.")
@click.option("--snapshot", metavar="VG/SNAP|UUID",
              help="Back up an LVM snapshot (classic or thin).")
@click.option("--device", metavar="PATH", help="Back up a block device or image file.")
@click.option("--incremental", is_flag=True,
              help="Incremental: the parent is the volume's latest available backup.")
@click.option("--force", is_flag=True,
              help="Back up an in-use volume through a temporary snapshot.")
@click.option("--keep-snapshot", is_flag=True,
              help="With --volume: read it through a snapshot and keep that snapshot as the "
                   "base the next incremental lists its changes against (one per volume).")
@click.option("--name", help="A name for the backup.")
@click.option("--description", help="A description for the backup.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Label the backup (repeatable); list and prune filter on labels.")
@wait_option
@pass_app
def create(app: App, volumes: tuple[str, ...], group: str | None, snapshot: str | None,
           device: str | None, incremental: bool, force: bool, keep_snapshot: bool,
           name: str | None, description: str | None, labels: tuple[str, ...],
           wait: float) -> None:
    """Back up a volume, a snapshot or a device, and print the new backup record.

    \b
    Examples:
      lvbackup create --snapshot vg0/data-snap-0300
      lvbackup create --volume vg0/data --force --incremental
      lvbackup create --volume vg0/thin --force --incremental --keep-snapshot
      lvbackup --json create --device /srv/vm.img --name nightly --label tier=gold
      lvbackup create --group db --volume vg0/db --volume vg0/wal --force --incremental
    """
    label_map = parse_labels(labels)
    if group is not None:
        if snapshot or device or name or description:
            raise click.UsageError("--group takes volumes (--volume), not --snapshot, "
                                   "--device, --name or --description")
        app.emit(create_group(app.session(wait), group, list(volumes), incremental=incremental,
                              force=force, keep_snapshot=keep_snapshot, labels=label_map,
                              quiesce=quiesce_of(app.config), progress=app.progress),
                 print_group)
        return
    if len(volumes) > 1:
        raise click.UsageError("--volume is given once (several volumes: --group NAME)")
    volume = volumes[0] if volumes else None
    source, source_name = select_source(app.config, volume=volume, snapshot=snapshot,
                                        device=device, force=force,
                                        keep_snapshot=keep_snapshot or None)
    session = app.session(wait)
    with app.progress("backup") as progress:
        result = create_backup(session, source, incremental=incremental, name=name,
                               description=description, labels=label_map,
                               progress=progress, source_name=source_name)
    s, rec = result.stats, result.record
    if rec.get("change_fallback"):
        app.log(f"change tracking not used: {rec['change_fallback']}")
    app.log(f"{rec.get('change_source')}: read {human_size(s.bytes_read)}, holes "
            f"{human_size(s.hole_bytes)}, unchanged "
            f"{human_size(s.unchanged_bytes)}, reused {human_size(s.reused_bytes)}, "
            f"stored {human_size(s.stored_bytes)} (of {human_size(s.new_bytes)} new)")
    app.emit(result.record, print_record)


@cli.command("list")
@click.option("--volume", metavar="VG/LV|UUID|PATH", help="Only backups of this volume.")
@click.option("--status", type=click.Choice(STATUSES), help="Only backups in this status.")
@click.option("--mapped", is_flag=True,
              help="List mapped backups instead (lvbackup map): device, backup, mount points.")
@click.option("--group", metavar="NAME|ID",
              help="Only the members of this group's backups (a group name or group id).")
@label_option
@pass_app
def list_(app: App, volume: str | None, status: str | None, mapped: bool,
          group: str | None, labels: tuple[str, ...]) -> None:
    """List backups (deleted ones only with --status deleted), with their lineage.

    \b
    Examples:
      lvbackup list --volume vg0/data --status available
      lvbackup list --label job=nightly-data
      lvbackup list --mapped
      lvbackup list --group db
    """
    if mapped:
        if volume or status or labels or group:
            raise click.UsageError("--mapped takes no other option")
        app.emit(mapped_backups(app.session()), print_maps)
        return
    rows = list_backups(app.session(), volume, status, parse_labels(labels))
    if group is not None:
        members = {m["id"] for m in group_backups(app.session(), group)}
        rows = [r for r in rows if r["id"] in members]
    app.emit(rows, print_records)


@cli.command()
@click.argument("backup_id")
@click.option("--chain", is_flag=True,
              help="Print the chain back to the full backup (with --json: a list of records, "
                   "this backup first).")
@pass_app
def show(app: App, backup_id: str, chain: bool) -> None:
    """Show one backup's record (ID may be a unique prefix); for an incremental, its chain
    of parents back to the full backup, and its dependents.

    \b
    Examples:
      lvbackup show 3f2a
      lvbackup --json show 3f2a --chain
      lvbackup show 9c1e   # a group backup's id: the group and its members
    """
    try:
        rec, lineage, dependents = show_backup(app.session(), backup_id)
    except NotFoundError:
        if chain or not app.session().catalog.group(backup_id):
            raise
        app.emit(one_group(app.session(), backup_id), print_group)
        return
    if chain:
        app.emit(lineage, print_records)
        return
    app.emit(rec, lambda r: print_lineage(r, lineage, dependents))


@cli.command()
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


@cli.command("map")
@click.argument("backup_id")
@click.option("--writable", is_flag=True,
              help="Accept writes, kept in an overlay in cache_dir (never in the repository) "
                   "and discarded at unmap.")
@wait_option
@pass_app
def map_(app: App, backup_id: str, writable: bool, wait: float) -> None:
    """Expose a backup as a block device (/dev/nbdN, read-only) and print its path.

    Reads fetch and check blocks on demand; a damaged block is an I/O error, never wrong
    data. The backup cannot be deleted or garbage-collected while it is mapped. Needs root,
    nbdkit, nbdkit-plugin-python, nbd-client and the nbd kernel module.

    \b
    Examples:
      lvbackup map 3f2a
      lvbackup map 3f2a --writable && fsck -n /dev/nbd0
      lvbackup unmap /dev/nbd0
    """
    info = map_backup(app.session(wait), backup_id, writable=writable)
    app.emit(info, lambda r: click.echo(r["device"]))


@cli.command()
@click.argument("target", metavar="DEVICE|ID")
@pass_app
def unmap(app: App, target: str) -> None:
    """Remove a mapped backup's device (or every map of backup ID); also clears what a
    crashed map left.

    \b
    Examples:
      lvbackup unmap /dev/nbd0
      lvbackup unmap 3f2a
    """
    infos = unmap_backup(app.session(), target)

    def human(rows: list[dict]) -> None:
        for r in rows:
            click.echo(f"Unmapped backup {r['backup_id']} from {r['device'] or 'no device'}")

    app.emit(infos, human)


@cli.command("mount")
@click.argument("backup_id")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--partition", type=click.IntRange(min=1), metavar="N",
              help="Mount partition N of a backed-up disk image.")
@click.option("--writable", is_flag=True,
              help="Mount read-write; writes go to an overlay discarded at unmount.")
@wait_option
@pass_app
def mount_(app: App, backup_id: str, mountpoint: str, partition: int | None, writable: bool,
           wait: float) -> None:
    """Map a backup and mount its filesystem read-only (journals are not replayed), to
    copy single files out.

    \b
    Examples:
      lvbackup mount 3f2a /mnt/restore && cp /mnt/restore/etc/fstab /tmp/
      lvbackup mount 9c41 /mnt/disk --partition 2
      lvbackup unmount /mnt/restore
    """
    info = mount_backup(app.session(wait), backup_id, mountpoint, partition=partition,
                        writable=writable)
    app.emit(info, lambda r: click.echo(f"Mounted backup {r['backup_id']} ({r['mounted']}, "
                                        f"{r['filesystem']}) on {r['mountpoint']}"))


@cli.command()
@click.argument("mountpoint")
@pass_app
def unmount(app: App, mountpoint: str) -> None:
    """Unmount a mounted backup and unmap it.

    \b
    Example:
      lvbackup unmount /mnt/restore
    """
    info = unmount_backup(app.session(), mountpoint)
    app.emit(info, lambda r: click.echo(f"Unmounted {mountpoint} and unmapped backup "
                                        f"{r['backup_id']} from {r['device']}"))


@cli.command()
@click.argument("backup_id", required=False)
@click.option("--group", "group_id", metavar="ID",
              help="Delete every member of this group backup, or none.")
@click.option("--force", is_flag=True,
              help="Delete whatever its status (not if it has dependents).")
@wait_option
@pass_app
def delete(app: App, backup_id: str | None, group_id: str | None, force: bool,
           wait: float) -> None:
    """Delete a backup (its data is reclaimed by the next 'lvbackup gc').

    \b
    Example:
      lvbackup delete 3f2a
      lvbackup delete --group 9c1e
    """
    if (backup_id is None) == (group_id is None):
        raise click.UsageError("give the backup to delete, or --group ID")
    if group_id is not None:
        app.emit(delete_group(app.session(wait), group_id, force=force),
                 lambda g: click.echo(f"Deleted group backup {g['group_id']}: "
                                      f"{count(len(g['backups']), 'backup')}"))
        return
    assert backup_id is not None
    rec = delete_backup(app.session(wait), backup_id, force=force)
    app.emit(rec, lambda r: click.echo(f"Deleted backup {r['id']}"))


@cli.command()
@click.argument("backup_id")
@pass_app
def protect(app: App, backup_id: str) -> None:
    """Protect a backup: prune keeps it and delete refuses it, until 'unprotect'.

    \b
    Example:
      lvbackup protect 3f2a
    """
    rec = set_protected(app.session(), backup_id, True)
    app.emit(rec, lambda r: click.echo(f"Protected backup {r['id']}"))


@cli.command()
@click.argument("backup_id")
@pass_app
def unprotect(app: App, backup_id: str) -> None:
    """Lift a backup's protection (prune and delete may remove it again).

    \b
    Example:
      lvbackup unprotect 3f2a
    """
    rec = set_protected(app.session(), backup_id, False)
    app.emit(rec, lambda r: click.echo(f"Unprotected backup {r['id']}"))


def _keep_option(kind: str, what: str):
    return click.option(f"--keep-{kind}", kind, type=click.IntRange(min=0), default=0,
                        metavar="N", help=f"Keep {what}.")


@cli.command()
@_keep_option("last", "the N newest backups")
@_keep_option("hourly", "the newest backup of each of the last N hours that have one")
@_keep_option("daily", "the newest backup of each of the last N days that have one")
@_keep_option("weekly", "the newest backup of each of the last N ISO weeks that have one")
@_keep_option("monthly", "the newest backup of each of the last N months that have one")
@_keep_option("yearly", "the newest backup of each of the last N years that have one")
@click.option("--volume", "volumes", multiple=True, metavar="VG/LV|UUID|PATH",
              help="Only this volume's backups (repeatable) [default: every volume].")
@label_option
@click.option("--dry-run", "-n", is_flag=True, help="Print what would be deleted; delete nothing.")
@wait_option
@pass_app
def prune(app: App, last: int, hourly: int, daily: int, weekly: int, monthly: int, yearly: int,
          volumes: tuple[str, ...], labels: tuple[str, ...], dry_run: bool, wait: float) -> None:
    """Delete the available backups that no --keep-* rule keeps, per volume.

    Time buckets are UTC, by each backup's data_timestamp. Protected backups are always kept.
    Manifests are self-contained, so a kept incremental whose parent is pruned stays
    restorable: it is re-parented to its nearest kept ancestor (or becomes a full backup),
    as the catalog records. Space is reclaimed by the next 'lvbackup gc'.

    \b
    Examples:
      lvbackup prune --keep-last 3 --keep-daily 7 --keep-weekly 4 --keep-monthly 12 --dry-run
      lvbackup prune --volume vg0/data --label job=nightly --keep-daily 14
    """
    policy = Policy(last=last, hourly=hourly, daily=daily, weekly=weekly, monthly=monthly,
                    yearly=yearly)
    if policy.empty:
        raise UsageError("give at least one --keep-* option greater than 0 "
                         "(prune never deletes every backup)")
    label_map = parse_labels(labels)
    report = prune_backups(app.session(wait), policy, volumes=list(volumes), labels=label_map,
                           dry_run=dry_run)

    def human(r: dict) -> None:
        rows = [(k, "keep", ", ".join(k["reasons"])) for k in r["keep"]]
        rows += [(k, "would delete" if r["dry_run"] else "deleted", "") for k in r["remove"]]
        rows.sort(key=lambda x: (x[0]["volume_name"] or "", x[0]["data_timestamp"]))
        print_table([Col("id", 10), Col("volume", 8, "path"), Col("data timestamp (UTC)", 9),
                     Col("action", 10), Col("why", 5, "text")],
                    [[short(item["id"]), item["volume_name"] or "",
                      when(item["data_timestamp"]), action, why]
                     for item, action, why in rows])
        for m in r["reparented"]:
            click.echo(f"{'Would re-parent' if r['dry_run'] else 'Re-parented'} "
                       f"{short(m['id'])} to "
                       f"{short(m['new_parent_id']) if m['new_parent_id'] else 'none'}"
                       f"{'' if m['new_parent_id'] else ' (now a full backup)'}")
        verb = "Would delete" if r["dry_run"] else "Deleted"
        click.echo(f"{verb} {count(len(r['remove']), 'backup')}, kept {len(r['keep'])}"
                   + ("" if r["dry_run"] or not r["remove"] else
                      "; run 'lvbackup gc' to reclaim space"))

    app.emit(report, human)


@cli.command("run")
@click.argument("job_names", nargs=-1, metavar="[JOB]...")
@wait_option
@pass_app
def run_(app: App, job_names: tuple[str, ...], wait: float) -> None:
    """Run the jobs of the configuration's 'jobs:' section (all, or those named).

    A failing job does not stop the others; the exit status is the worst of them. Prints a
    summary of every job (one JSON document with --json).

    \b
    Examples:
      lvbackup run
      lvbackup --quiet run data-nightly root-nightly
      lvbackup --json run > /var/log/lvbackup/last-run.json
    """
    summary = run_jobs(app.session(wait), job_names, progress=app.progress, log=app.log)

    def human(r: dict) -> None:
        cols = [Col("job", 10, "text"), Col("status", 9), Col("backup", 8), Col("kind", 4),
                Col("size", 3), Col("stored", 2), Col("pruned", 1), Col("time", 6),
                Col("detail", 7, "text")]
        rows = []
        for j in r["jobs"]:
            b = j["backup"] or {}
            rows.append([j["job"], j["status"] if j["status"] != "failed"
                         else f"FAILED ({j['exit_code']})", short(b.get("id")),
                         j["kind"] or "-", human_size(b.get("size")),
                         human_size(b.get("stored_bytes")), str(len(j["pruned"])),
                         f"{j['duration_seconds']:.1f} s",
                         j["error"] or (j["why"] if j["status"] == "skipped" else "")])
        print_table(cols, rows)

    app.emit(summary, human)
    if summary["exit_code"]:
        # One line that says why, also with --quiet (where the jobs' own lines are not shown).
        failed = [f"{j['job']} ({j['error']})" for j in summary["jobs"] if j["exit_code"]]
        raise _JobsFailed(f"{len(failed)} of {count(len(summary['jobs']), 'job')} failed: "
                          f"{'; '.join(failed)}", summary["exit_code"])


class _JobsFailed(LvbackupError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def parse_percent(ctx: click.Context, param: click.Parameter, text: str | None
                  ) -> Fraction | None:
    if text is None:
        return None
    try:
        share = Fraction(text.strip()) / 100
    except (ValueError, ZeroDivisionError):
        share = Fraction(-1)
    if not 0 < share <= 1:
        raise click.BadParameter(f"{text!r} is not a percentage above 0, at most 100 "
                                 "(e.g. 5)")
    return share


def parse_budget(ctx: click.Context, param: click.Parameter, text: str | None
                 ) -> float | None:
    if text is None:
        return None
    try:
        return parse_duration(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a positive duration (e.g. 30s, 10m, "
                                 "2h)") from None


@cli.command()
@click.argument("backup_ids", nargs=-1, metavar="[ID]...")
@click.option("--deep", is_flag=True, help="Re-read and re-hash every chunk.")
@click.option("--sample", metavar="PERCENT", callback=parse_percent,
              help="Deep, but read only the next PERCENT of the chunks: successive runs read "
                   "every chunk once in 100/PERCENT runs (the position is kept in cache_dir).")
@click.option("--max-duration", metavar="DURATION", callback=parse_budget,
              help="Deep, but stop reading chunks after DURATION (e.g. 30s, 10m, 2h); the next "
                   "run goes on from there.")
@wait_option
@pass_app
def verify(app: App, backup_ids: tuple[str, ...], deep: bool, sample: Fraction | None,
           max_duration: float | None, wait: float) -> None:
    """Check backups (all available ones by default); exit 3 if any is damaged.

    \b
    Examples:
      lvbackup verify --deep
      lvbackup verify --deep --sample 5          # daily: every chunk read in 20 days
      lvbackup verify --deep --max-duration 2h
    """
    with app.progress("verify") as progress:
        report = verify_backups(app.session(wait), list(backup_ids), deep=deep, sample=sample,
                                budget=max_duration, progress=progress)

    def human(r: dict) -> None:
        for e in r["index_errors"]:
            click.echo(f"FAILED  {e}")
        for b in r["backups"]:
            click.echo(f"{'ok    ' if b['ok'] else 'FAILED'}  {b['id']}  {b['volume_name']}"
                       + (f"  {b['error']}" if b["error"] else ""))
        if r["cycle"]:
            c = r["cycle"]
            click.echo(f"read {r['chunks_checked']} of {r['chunks_total']} chunks; cycle "
                       f"{c['number']} is {c['done_percent']:g}% done"
                       + (" (stopped at --max-duration)" if c["out_of_time"] else ""))

    app.emit(report, human)
    if not report["ok"]:
        bad = [b["id"] for b in report["backups"] if not b["ok"]]
        detail = (f"{'backup' if len(bad) == 1 else 'backups'} {', '.join(bad)}" if bad
                  else "the index")
        raise CorruptionError(f"verify found damage in {detail}")


@cli.command()
@click.argument("backup_id")
@click.argument("other_id", required=False)
@click.option("--jsonl", is_flag=True, help="One JSON object per range on stdout.")
@pass_app
def diff(app: App, backup_id: str, other_id: str | None, jsonl: bool) -> None:
    """The byte ranges where a backup differs from its parent (or from OTHER, a backup of
    the same volume), from the manifests alone.

    \b
    Examples:
      lvbackup diff 3f2a
      lvbackup diff 3f2a 9c41 --jsonl | while read -r range; do ...; done
    """
    report = diff_backups(app.session(), backup_id, other_id)
    if jsonl:
        for r in report["ranges"]:
            click.echo(json.dumps(r))
        return

    def human(r: dict) -> None:
        for x in r["ranges"]:
            click.echo(f"{x['offset']:>16} {x['length']:>14}  {x['change']}")
        click.echo(f"{count(len(r['ranges']), 'range')}, "
                   f"{human_size(r['differing_bytes'])} of "
                   f"{human_size(r['size'])} differ from backup {r['other_id']}")

    app.emit(report, human)


@cli.command()
@wait_option
@pass_app
def gc(app: App, wait: float) -> None:
    """Reclaim space: delete packs no backup uses, repack mostly-unused ones.

    \b
    Example:
      lvbackup gc
    """
    with app.progress("gc") as progress:
        stats = collect_garbage(app.session(wait), progress)

    def human(s: dict) -> None:
        click.echo(f"Deleted {count(s['packs_deleted'], 'pack')}, "
                   f"repacked {s['packs_repacked']}, "
                   f"freed {human_size(s['bytes_freed'])}")

    app.emit(stats, human)


@cli.command()
@click.argument("backup_ids", metavar="[ID]...", nargs=-1)
@click.option("--all", "every", is_flag=True, help="Every available backup.")
@click.option("--volume", metavar="VG/LV|UUID|PATH", help="Every available backup of a volume.")
@click.option("--to-config", "to_config", required=True, metavar="FILE",
              type=click.Path(dir_okay=False),
              help="The configuration whose repository and catalog receive the copies.")
@click.option("--init", "init_target", is_flag=True,
              help="Create the target repository if it does not exist (without it, a "
                   "missing one is refused: a typo or an unmounted disk).")
@wait_option
@pass_app
def copy(app: App, backup_ids: tuple[str, ...], every: bool, volume: str | None,
         to_config: str, init_target: bool, wait: float) -> None:
    """Copy backups into another configuration's repository and catalog (off-site), keeping
    their ids, lineage, timestamps and labels. Only chunks the target lacks are sent;
    parents go first; a rerun resumes an interrupted copy and copies nothing twice.
    Either repository may be encrypted, each under its own key: the copies are
    re-encrypted for the target, whose passphrase comes from $LVBACKUP_TARGET_PASSPHRASE
    or its own configuration ($LVBACKUP_PASSPHRASE is only this configuration's).

    \b
    Examples:
      lvbackup copy --all --to-config /etc/lvbackup/offsite.yaml --init
      lvbackup copy 3f2a --to-config offsite.yaml
    """
    with app.progress("copy") as progress:
        report = copy_backups(app.session(wait), Path(to_config), list(backup_ids), every,
                              volume, progress, init=init_target).as_dict()

    def human(r: dict) -> None:
        present = len(r["already_present"])
        if not r["copied"]:
            click.echo(f"Nothing new to copy: {count(present, 'backup')} already in "
                       f"{r['target']}")
            return
        click.echo(f"Copied {count(len(r['copied']), 'backup')} to {r['target']} "
                   f"({count(r['chunks_sent'], 'chunk')}, {human_size(r['bytes_sent'])} "
                   f"stored); {present} {'was' if present == 1 else 'were'} there already")

    app.emit(report, human)


@cli.command("export-record")
@click.argument("backup_id")
@pass_app
def export_record(app: App, backup_id: str) -> None:
    """Print a backup's catalog record as base64 text (for import-record); with --json,
    {"backup_id": ..., "record": the same text}. The text is printed even with --quiet:
    it is what the command is for.

    \b
    Example:
      lvbackup export-record 3f2a > 3f2a.record
    """
    bid, text = export_backup_record(app.session(), backup_id)
    doc: ExportedRecord = {"backup_id": bid, "record": text}
    if app.as_json:
        app.emit(doc, click.echo)
    else:
        click.echo(text)


@cli.command("import-record")
@click.argument("source", metavar="FILE|-")
@wait_option
@pass_app
def import_record(app: App, source: str, wait: float) -> None:
    """Re-create a backup's catalog row from export-record's output.

    \b
    Example:
      lvbackup import-record 3f2a.record
    """
    rec = import_backup_record(app.session(wait), read_text_input(source))
    app.emit(rec, lambda r: click.echo(f"Imported backup {r['id']}"))


@cli.group()
def catalog() -> None:
    """Catalog maintenance.

    \b
    Example:
      lvbackup catalog rebuild
    """


@catalog.command("rebuild")
@wait_option
@pass_app
def catalog_rebuild(app: App, wait: float) -> None:
    """Recreate the catalog from the repository's manifests.

    \b
    Example:
      lvbackup catalog rebuild
    """
    result = rebuild_catalog(app.config, wait)
    app.emit(result,
             lambda r: click.echo(f"Recovered {count(r['recovered'], 'backup')} from the "
                                  "repository"))


@cli.group()
def snapshot() -> None:
    """Create, list and delete LVM snapshots.

    \b
    Example:
      lvbackup snapshot create vg0/data && lvbackup snapshot list vg0/data
    """


@snapshot.command("create")
@click.argument("volume", metavar="VG/LV")
@click.option("--name", help="Snapshot name [default: <LV>-snap-<UTC time>].")
@click.option("--size", help="Classic snapshots: COW size (2G, 20%ORIGIN). Thin: not allowed.")
@pass_app
def snapshot_create(app: App, volume: str, name: str | None, size: str | None) -> None:
    """Snapshot a volume: thin for a thin volume, classic otherwise.

    \b
    Example:
      lvbackup snapshot create vg0/data --name data-0300
    """
    app.emit(create_snapshot(volume, name, size),
             lambda r: click.echo(f"Created snapshot {r['full_name']} ({r['uuid']})"))


@snapshot.command("list")
@click.argument("volume", metavar="[VG/LV]", required=False)
@pass_app
def snapshot_list(app: App, volume: str | None) -> None:
    """List snapshots (of one volume, or all).

    \b
    Example:
      lvbackup snapshot list vg0/data
    """
    app.emit(list_snapshots(volume), lambda rows: print_lvs(rows, "snapshots"))


@snapshot.command("delete")
@click.argument("snap", metavar="VG/SNAP")
@pass_app
def snapshot_delete(app: App, snap: str) -> None:
    """Delete a snapshot (its backups are kept).

    \b
    Example:
      lvbackup snapshot delete vg0/data-0300
    """
    app.emit(delete_snapshot(snap), lambda r: click.echo(f"Deleted snapshot {r['full_name']}"))


@cli.group()
def key() -> None:
    """An encrypted repository's keys: export them (keep that copy safe), import, add a
    passphrase or key file, change a passphrase. Secrets never come from arguments.

    \b
    Example:
      lvbackup key export --to /root/lvbackup-key.txt
      LVBACKUP_NEW_PASSPHRASE=... lvbackup key change-passphrase
    """


@key.command("list")
@pass_app
def key_list(app: App) -> None:
    """List the key slots (each a passphrase or key file that opens the repository).

    \b
    Example:
      lvbackup key list
    """
    def human(rows: list[dict]) -> None:
        for r in rows:
            click.echo(f"{r['slot']}  {r['kind']}{'  (used now)' if r['used'] else ''}")

    app.emit(list_keys(app.session()), human)


@key.command("export")
@click.option("--to", "to", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write it to this new file (0600) instead of standard output.")
@pass_app
def key_export(app: App, to: str | None) -> None:
    """Print the key slots as text: with a passphrase (or key file), it opens the backups
    even if the repository's own slots are lost. Keep it apart from the repository.

    \b
    Example:
      lvbackup key export --to /root/lvbackup-key.txt
    """
    text = export_key(app.session(), Path(to) if to else None)
    if to is None:
        click.echo(text, nl=False)   # JSON already
    else:
        app.emit({"exported_to": to}, lambda r: click.echo(f"Key exported to {to}"))


@key.command("import")
@click.argument("source", metavar="FILE|-")
@pass_app
def key_import(app: App, source: str) -> None:
    """Put the key slots of a key export back into the repository.

    \b
    Example:
      LVBACKUP_PASSPHRASE=... lvbackup key import /root/lvbackup-key.txt
    """
    text = read_text_input(source)
    app.emit(import_key(app.session(), text),
             lambda r: click.echo(f"Imported {count(len(r['slots_added']), 'key slot')}"))


new_passphrase_option = click.option(
    "--new-passphrase-file", type=click.Path(dir_okay=False), metavar="FILE",
    help="Read the new passphrase from this file [default: $LVBACKUP_NEW_PASSPHRASE].")


@key.command("add")
@new_passphrase_option
@click.option("--key-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Create a new key file here (0600) and add it, instead of a passphrase.")
@pass_app
def key_add(app: App, new_passphrase_file: str | None, key_file: str | None) -> None:
    """Add another passphrase or key file that opens the repository.

    \b
    Example:
      LVBACKUP_NEW_PASSPHRASE=... lvbackup key add
      lvbackup key add --key-file /root/lvbackup.key
    """
    if new_passphrase_file and key_file:
        raise UsageError("give --new-passphrase-file or --key-file, not both")
    result = add_key(app.session(), Path(new_passphrase_file) if new_passphrase_file else None,
                     Path(key_file) if key_file else None)
    app.emit(result, lambda r: click.echo(f"Added {r['kind'].replace('_', ' ')} slot "
                                          f"{r['slot']}"))


@key.command("change-passphrase")
@new_passphrase_option
@pass_app
def key_change_passphrase(app: App, new_passphrase_file: str | None) -> None:
    """Replace the current passphrase (no data is rewritten).

    \b
    Example:
      LVBACKUP_PASSPHRASE=old LVBACKUP_NEW_PASSPHRASE=new lvbackup key change-passphrase
    """
    result = change_passphrase(app.session(),
                               Path(new_passphrase_file) if new_passphrase_file else None)
    app.emit(result, lambda r: click.echo(f"Passphrase changed (slot {r['slot']} replaces "
                                          f"{r['replaced']})"))


@cli.command()
@pass_app
def volumes(app: App) -> None:
    """List logical volumes with their snapshots and each one's last backup.

    \b
    Example:
      lvbackup volumes
    """
    out = list_volumes(app.session())

    def human(rows: list[dict]) -> None:
        cols = [Col("volume / snapshot", 10, "path"), Col("size", 8), Col("created (UTC)", 5),
                Col("state", 7, "text"), Col("last backup", 6, "text")]
        table = []
        for r in rows:
            items = [(r, r["full_name"])] + [
                (s, "  └ " + s["name"] + (" (base)" if s["base"] else "")) for s in r["snapshots"]]
            for item, label in items:
                b = item["last_backup"]
                table.append([label, human_size(item["size"]), when(item["created_at"]),
                              item["state"],
                              f"{short(b['id'])} {when(b['created_at'])}" if b else "-"])
        print_table(cols, table)

    app.emit(out, human)


@cli.group("config")
def config_group() -> None:
    """Configuration.

    \b
    Example:
      lvbackup --config ./lvbackup.yaml config check
    """


@config_group.command("check")
@pass_app
def config_check(app: App) -> None:
    """Validate the configuration file and print the effective configuration (every key,
    defaults included). An invalid file exits 2 naming the key; a hook command that is not
    found, or an event_log or metrics file in a directory that does not exist, is reported
    as a warning (nothing is created).

    \b
    Example:
      lvbackup --config ./lvbackup.yaml config check
    """
    import yaml

    config = app.config
    for warning in config_warnings(config):
        app.warn(warning)
    app.emit(effective_config(config),
             lambda d: click.echo(yaml.safe_dump(d, sort_keys=False, default_flow_style=False),
                                  nl=False))


# --- entry point ---------------------------------------------------------------------------

class Terminated(SystemExit):
    """SIGTERM: unwinding through every finally, then exiting 128 + the signal number."""


def _on_signal(signum: int, _frame) -> None:
    # Unwind through every finally: temporary snapshots are removed, rows marked error.
    raise Terminated(128 + signum)


def exit_status(e: BaseException, verbose: bool = False, as_json: bool = False) -> int:
    """The one place where an exception becomes a line on stderr and an exit status: with
    --json, that line is a JSON object ({"error": message, "exit_code": status})."""
    code, kind, message = _failure(e, verbose)
    if message is not None:
        if as_json:
            click.echo(json.dumps({"error": message, "exit_code": code}), err=True)
        else:
            click.echo(f"lvbackup: {kind + ': ' if kind else ''}{message}", err=True)
    return code


def _failure(e: BaseException, verbose: bool) -> tuple[int, str, str | None]:
    """(exit status, kind of failure, message) of an exception; no message for an exit
    that says nothing."""
    if isinstance(e, click.ClickException):
        return (e.exit_code if e.exit_code else EXIT_USAGE), "error", e.format_message()
    if isinstance(e, (click.exceptions.Abort, KeyboardInterrupt)):
        return EXIT_INTERRUPTED, "", "interrupted"
    if isinstance(e, LvbackupError):
        return e.exit_code, "error", str(e)
    if isinstance(e, BrokenPipeError):
        return EXIT_FAILED, "", None
    if isinstance(e, Terminated):  # from _on_signal: the work was stopped and cleaned up
        code = e.code if isinstance(e.code, int) else EXIT_FAILED
        return code, "", f"terminated by signal {code - 128}"
    if isinstance(e, SystemExit):  # click's own exits (shell completion, --help, --version)
        return (e.code if isinstance(e.code, int) else
                (0 if e.code is None else EXIT_FAILED)), "", None
    if verbose:
        traceback.print_exception(e)
    return EXIT_FAILED, "internal error", (f"{type(e).__name__}: {e} "
                                           "(rerun with --verbose for details)")


def main() -> None:
    """Run the command line (through launcher.main, which handled Ctrl-C until now)."""
    args = sys.argv[1:]
    # How a failure is reported is read from the words themselves: it may come before click
    # has parsed them (a bad option), and the global options may follow the command.
    verbose = "-v" in args or "--verbose" in args
    as_json = "--json" in args
    try:
        # From here on a Ctrl-C unwinds through every finally, as SIGTERM does.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _on_signal)
        # What lvbackup creates is its owner's alone (docs/security.md), also files that
        # other code creates for it (SQLite's, gc's scratch database); metrics set their
        # own mode.
        os.umask(0o077)
        faults.check_requested()
        tune_malloc()
        result = cli.main(prog_name="lvbackup", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except BaseException as e:  # noqa: BLE001 - never a traceback unless asked for
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # one Ctrl-C: one line, then exit
        code = exit_status(e, verbose, as_json)
    # The command is done: a Ctrl-C now changes nothing (and must not end in a traceback).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)
