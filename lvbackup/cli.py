"""The command line: parse, call the engine, render (rich tables, or one JSON document)."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import traceback
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import click

from . import __version__, engine, lvm, sources
from .catalog import STATUSES, BackupRecord, parse_labels
from .config import Config, as_dict, load_config
from .errors import EXIT_FAILED, EXIT_USAGE, LvbackupError, UsageError
from .datapath.pipeline import tune_malloc
from .lifecycle import Status
from .units import human_size

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

EXIT_CODES = """\b
Exit status:
  0   success
  1   the operation failed (I/O error, corruption found, ...)
  2   invalid usage, or a request the current state forbids
  75  the repository or volume is locked by another run (see --wait)
  'run' exits with the worst of its jobs' statuses (2 worst, then 1, then 75).
"""

# rich is imported only where it renders something: most runs (cron, scripts, --json,
# --quiet) never do, and its import is a sixth of the start-up time.

@functools.cache
def err_console() -> "Console":
    from rich.console import Console
    return Console(stderr=True, highlight=False)


def out_console() -> "Console":
    """Rich output on stdout. Not on a terminal (cron mail, a pipe, a log file), tables get
    room to stay readable instead of rich's default 80 columns."""
    from rich.console import Console
    wide = not sys.stdout.isatty() and not os.environ.get("COLUMNS")
    return Console(width=160 if wide else None)


def new_table(**options: Any) -> "Table":
    from rich.table import Table
    return Table(**options)


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in "KMG" and t[-1:] else ""
    try:
        return int(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 131072, 128K, 1M)") from None


class App:
    """Per-invocation state: global options, the configuration, the open engine."""

    def __init__(self, config_path: str | None, as_json: bool, quiet: bool, verbose: bool):
        self.config_path = config_path
        self.as_json = as_json
        self.quiet = quiet
        self.verbose = verbose
        self._config: Config | None = None
        self._lv: engine.Lvbackup | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def lv(self, wait: float = 0.0) -> engine.Lvbackup:
        if self._lv is None:
            self._lv = engine.Lvbackup(self.config, wait)
            self._lv.warn = self.warn
            click.get_current_context().call_on_close(self._lv.close)
        return self._lv

    def warn(self, message: str) -> None:
        """One line on stderr (above a progress bar, if one is shown), even with --quiet:
        a failed hook or an unwritable metrics file is worth a cron mail."""
        err_console().print(f"lvbackup: warning: {message}", markup=False, highlight=False,
                          soft_wrap=True)

    def emit(self, data: Any, human: Callable[[Any], None]) -> None:
        if self.as_json:
            click.echo(json.dumps(data, indent=2))
        else:
            human(data)

    def log(self, message: str) -> None:
        if not self.quiet:
            click.echo(message, err=True)

    @contextmanager
    def progress(self, label: str) -> Iterator[Callable[..., None] | None]:
        """A progress bar on stderr when it is a terminal and not --quiet (never on stdout):
        bytes done, throughput, ETA and, for a backup, bytes reused and stored so far.
        The callback is `update(done, total, stats=None)`."""
        if self.quiet or not sys.stderr.isatty():
            yield None
            return
        from .progressbar import progress_bar
        with progress_bar(label, err_console()) as update:
            yield update


class Group(click.Group):
    """Turns LvbackupError into one line on stderr and its exit status."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LvbackupError as e:
            click.echo(f"lvbackup: error: {e}", err=True)
            ctx.exit(e.exit_code)


pass_app = click.make_pass_decorator(App)
wait_option = click.option("--wait", type=click.FloatRange(min=0), default=0.0,
                           show_default=True, metavar="SECONDS",
                           help="Wait this long for a lock held by another run, then exit 75.")


@click.group(cls=Group, epilog=EXIT_CODES,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", metavar="FILE",
              help="Configuration file [default: $LVBACKUP_CONFIG, else /etc/lvbackup/lvbackup.yaml]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="Print nothing but the result.")
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
    ctx.obj = App(config_path, as_json, quiet, verbose)


# --- rendering -----------------------------------------------------------------------------

_SHOW_FIELDS = ("id", "name", "description", "status", "fail_reason", "volume_name", "volume_id",
                "snapshot_name", "snapshot_id", "parent_id", "is_incremental", "data_timestamp",
                "created_at", "updated_at", "size", "block_size", "stored_bytes",
                "num_dependent_backups", "has_dependent_backups")


def _labels_text(labels: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((labels or {}).items()))


def _when(ts: str | None) -> str:
    return (ts or "")[:19].replace("T", " ")


def print_record(rec: Mapping[str, Any]) -> None:
    """Key and value per line: plain text (no rich), since `create` ends with it."""
    keys = _SHOW_FIELDS + ("labels", "protected")
    width = max(map(len, keys))
    for key in keys:
        value = rec.get(key)
        if key in ("size", "stored_bytes") and value is not None:
            value = f"{human_size(value)} ({value} bytes)"
        elif key == "labels":
            value = _labels_text(value) or None
        click.echo(f"{key:<{width}}  {'-' if value is None else value}")


def print_lineage(rec: BackupRecord, chain: list[BackupRecord],
                  dependents: list[BackupRecord]) -> None:
    """A backup's record, the chain of parents back to its full backup, and its children."""
    print_record(rec)
    console = out_console()
    if len(chain) > 1 or rec.get("parent_id"):
        table = new_table(title="chain back to the full backup")
        for col in ("id", "kind", "status", "data timestamp (UTC)", "size", "stored", "name"):
            table.add_column(col, overflow="fold")
        for r in chain:
            table.add_row(r["id"], "incr" if r["is_incremental"] else "full", r["status"],
                          _when(r["data_timestamp"]), human_size(r["size"]),
                          human_size(r["stored_bytes"]), r["name"] or "")
        last = chain[-1]
        if last.get("is_incremental") and last.get("parent_id"):
            table.add_row(last["parent_id"], "?", "missing", "", "", "", "")
        console.print(table)
    if dependents:
        console.print("dependents: " + ", ".join(d["id"] for d in dependents))


def print_records(recs: list[dict]) -> None:
    table = new_table()
    for col in ("id", "volume", "kind", "status", "data timestamp (UTC)", "size", "stored",
                "parent", "deps", "name", "labels"):
        table.add_column(col, overflow="fold")
    for r in recs:
        status = r["status"] + (" (protected)" if r.get("protected") else "")
        table.add_row(r["id"][:8], r["volume_name"] or "", "incr" if r["is_incremental"] else "full",
                      status, _when(r["data_timestamp"]),
                      human_size(r["size"]), human_size(r["stored_bytes"]),
                      (r["parent_id"] or "-")[:8], str(r["num_dependent_backups"]),
                      r["name"] or "", _labels_text(r.get("labels")))
    out_console().print(table)


label_option = click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
                            help="Only backups with this label (repeatable: all must match).")


# --- commands ------------------------------------------------------------------------------

@cli.command()
@click.option("--block-size", metavar="N", help="Block size of a new repository (e.g. 128K).")
@pass_app
def init(app: App, block_size: str | None) -> None:
    """Create the repository and the catalog (idempotent).

    \b
    Example:
      lvbackup --config /etc/lvbackup/lvbackup.yaml init --block-size 128K
    """
    result = engine.init_repository(app.config, parse_size(block_size) if block_size else None)

    def human(r: dict) -> None:
        verb = "Created" if r["created"] else "Using existing"
        click.echo(f"{verb} repository {r['repository']} (block size {human_size(r['block_size'])}),"
                   f" catalog {r['catalog']}")

    app.emit(result, human)


@cli.command()
@click.option("--volume", metavar="VG/LV", help="Back up an LVM volume.")
@click.option("--snapshot", metavar="VG/SNAP|UUID", help="Back up an LVM snapshot (classic or thin).")
@click.option("--device", metavar="PATH", help="Back up a block device or image file.")
@click.option("--incremental", is_flag=True,
              help="Incremental: the parent is the volume's latest available backup.")
@click.option("--force", is_flag=True,
              help="Back up an in-use volume through a temporary snapshot.")
@click.option("--name", help="A name for the backup.")
@click.option("--description", help="A description for the backup.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Label the backup (repeatable); list and prune filter on labels.")
@wait_option
@pass_app
def create(app: App, volume: str | None, snapshot: str | None, device: str | None,
           incremental: bool, force: bool, name: str | None, description: str | None,
           labels: tuple[str, ...], wait: float) -> None:
    """Back up a volume, a snapshot or a device, and print the new backup record.

    \b
    Examples:
      lvbackup create --snapshot vg0/data-snap-0300
      lvbackup create --volume vg0/data --force --incremental
      lvbackup --json create --device /srv/vm.img --name nightly --label tier=gold
    """
    label_map = parse_labels(labels)
    if device and (volume or snapshot):
        raise click.UsageError("--device cannot be combined with --volume or --snapshot")
    if snapshot:
        source = sources.snapshot_source(snapshot, volume, lock_dir=app.config.lock_dir)
    elif volume:
        source = sources.volume_source(volume, force=force,
                                       snapshot_size=app.config.temp_snapshot_size,
                                       lock_dir=app.config.lock_dir)
    elif device:
        source = sources.device_source(device)
    else:
        raise click.UsageError("give the source: --volume VG/LV, --snapshot VG/SNAP or --device PATH")
    lv = app.lv(wait)
    # Names the volume in the metrics and in backup.create.error if the source cannot open.
    source_name = (os.path.realpath(device) if device else
                   volume.removeprefix("/dev/") if volume and "/" in volume else None)
    with app.progress("backup") as progress:
        result = engine.create_backup(lv, source, incremental=incremental, name=name,
                                      description=description, labels=label_map,
                                      progress=progress, source_name=source_name)
    s = result.stats
    app.log(f"read {human_size(s.bytes_read)}, holes {human_size(s.hole_bytes)}, unchanged "
            f"{human_size(s.unchanged_bytes)}, reused {human_size(s.reused_bytes)}, "
            f"stored {human_size(s.stored_bytes)} (of {human_size(s.new_bytes)} new)")
    app.emit(result.record, print_record)


@cli.command("list")
@click.option("--volume", metavar="VG/LV|UUID|PATH", help="Only backups of this volume.")
@click.option("--status", type=click.Choice(STATUSES), help="Only backups in this status.")
@label_option
@pass_app
def list_(app: App, volume: str | None, status: str | None, labels: tuple[str, ...]) -> None:
    """List backups (deleted ones only with --status deleted), with their lineage.

    \b
    Examples:
      lvbackup list --volume vg0/data --status available
      lvbackup list --label job=nightly-data
    """
    label_map = parse_labels(labels)
    from .catalog import to_record
    lv = app.lv()
    engine.recover_dead_runs(lv)
    names = [volume] if volume else []
    if volume and os.path.exists(volume):  # an image path as given to create --device
        names.append(os.path.realpath(volume))
    rows = [to_record(r) for r in lv.catalog.list(volumes=names, status=status,
                                                  labels=label_map)]
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
    """
    from .catalog import to_record
    lv = app.lv()
    engine.recover_dead_runs(lv)
    rec = to_record(lv.catalog.resolve(backup_id))
    lineage = [to_record(r) for r in engine.backup_chain(lv, rec["id"])]
    if chain:
        app.emit(lineage, print_records)
        return
    dependents = [to_record(r) for r in lv.catalog.children(rec["id"])]
    app.emit(rec, lambda r: print_lineage(r, lineage, dependents))


@cli.command()
@click.argument("backup_id")
@click.option("--to", metavar="VG/LV|DEVICE", help="An existing LV, device or file, at least as large.")
@click.option("--new-volume", metavar="VG/NAME", help="Create this LV and restore into it.")
@click.option("--thin-pool", metavar="POOL", help="With --new-volume: a thin LV in this pool.")
@click.option("--to-file", metavar="PATH|-", help="A new image file, or - for standard output.")
@click.option("--force", is_flag=True, help="Write to a target that is in use.")
@wait_option
@pass_app
def restore(app: App, backup_id: str, to: str | None, new_volume: str | None,
            thin_pool: str | None, to_file: str | None, force: bool, wait: float) -> None:
    """Restore a backup to an LV, a device, a file, or standard output.

    With no target, a new LV restore_backup_<id> is created in the volume's VG.

    \b
    Examples:
      lvbackup restore 3f2a --to vg0/data
      lvbackup restore 3f2a --new-volume vg0/data-copy --thin-pool pool0
      lvbackup restore 3f2a --to-file /srv/restored.img
      lvbackup restore 3f2a --to-file - | ssh host 'dd of=/dev/vg0/data bs=1M'
    """
    if sum(x is not None for x in (to, to_file, new_volume)) > 1:
        raise click.UsageError("give one target: --to, --new-volume or --to-file")
    if thin_pool and not new_volume:
        raise click.UsageError("--thin-pool goes with --new-volume")
    if to_file == "-" and app.as_json:
        raise click.UsageError("--json cannot be combined with --to-file - (stdout carries the image)")
    lv = app.lv(wait)
    with app.progress("restore") as progress:
        rec = engine.restore_backup(lv, backup_id, to=to, to_file=to_file, new_volume=new_volume,
                                    thin_pool=thin_pool, force=force, progress=progress)
    if to_file == "-":
        return
    where = to or to_file or new_volume or "a new volume"
    app.emit(rec, lambda r: click.echo(f"Restored backup {r['id']} to {where}"))


@cli.command()
@click.argument("backup_id")
@click.option("--force", is_flag=True, help="Delete whatever its status (not if it has dependents).")
@wait_option
@pass_app
def delete(app: App, backup_id: str, force: bool, wait: float) -> None:
    """Delete a backup (its data is reclaimed by the next 'lvbackup gc').

    \b
    Example:
      lvbackup delete 3f2a
    """
    rec = engine.delete_backup(app.lv(wait), backup_id, force=force)
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
    rec = engine.set_protected(app.lv(), backup_id, True)
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
    rec = engine.set_protected(app.lv(), backup_id, False)
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
    from .retention import Policy, prune as prune_backups
    policy = Policy(last=last, hourly=hourly, daily=daily, weekly=weekly, monthly=monthly,
                    yearly=yearly)
    if policy.empty:
        raise UsageError("give at least one --keep-* option greater than 0 "
                         "(prune never deletes every backup)")
    label_map = parse_labels(labels)
    names = list(volumes)
    names += [os.path.realpath(v) for v in volumes if os.path.exists(v)]
    lv = app.lv(wait)
    report = prune_backups(lv, policy, volumes=names, labels=label_map, dry_run=dry_run)

    def human(r: dict) -> None:
        table = new_table()
        for col in ("id", "volume", "data timestamp (UTC)", "action", "why"):
            table.add_column(col, overflow="fold")
        rows = [(k, "keep", ", ".join(k["reasons"])) for k in r["keep"]]
        rows += [(k, "would delete" if r["dry_run"] else "deleted", "") for k in r["remove"]]
        for item, action, why in sorted(rows, key=lambda x: (x[0]["volume_name"] or "",
                                                             x[0]["data_timestamp"])):
            table.add_row(item["id"][:8], item["volume_name"] or "",
                          _when(item["data_timestamp"]), action, why)
        out_console().print(table)
        for m in r["reparented"]:
            click.echo(f"{'Would re-parent' if r['dry_run'] else 'Re-parented'} {m['id']} "
                       f"to {m['new_parent_id'] or 'none (now a full backup)'}")
        verb = "Would delete" if r["dry_run"] else "Deleted"
        click.echo(f"{verb} {len(r['remove'])} backups, kept {len(r['keep'])}"
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
    from .jobs import run_jobs
    lv = app.lv(wait)
    summary = run_jobs(lv, job_names, progress=app.progress, log=app.log)

    def human(r: dict) -> None:
        table = new_table()
        for col in ("job", "status", "backup", "kind", "size", "stored", "pruned", "time",
                    "detail"):
            table.add_column(col, overflow="fold")
        for j in r["jobs"]:
            b = j["backup"] or {}
            table.add_row(j["job"], j["status"] if j["status"] != "failed"
                          else f"FAILED ({j['exit_code']})",
                          (b.get("id") or "-")[:8], j["kind"] or "-",
                          human_size(b.get("size")), human_size(b.get("stored_bytes")),
                          str(len(j["pruned"])), f"{j['duration_seconds']:.1f} s",
                          j["error"] or (j["why"] if j["status"] == "skipped" else ""))
        out_console().print(table)

    app.emit(summary, human)
    if summary["exit_code"]:
        failed = [j["job"] for j in summary["jobs"] if j["exit_code"]]
        raise _JobsFailed(f"{len(failed)} of {len(summary['jobs'])} jobs failed: "
                          f"{', '.join(failed)}", summary["exit_code"])


class _JobsFailed(LvbackupError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@cli.command()
@click.argument("backup_ids", nargs=-1, metavar="[ID]...")
@click.option("--deep", is_flag=True, help="Re-read and re-hash every chunk.")
@wait_option
@pass_app
def verify(app: App, backup_ids: tuple[str, ...], deep: bool, wait: float) -> None:
    """Check backups (all available ones by default); exit 1 if any is damaged.

    \b
    Example:
      lvbackup verify --deep
    """
    with app.progress("verify") as progress:
        report = engine.verify_backups(app.lv(wait), list(backup_ids), deep=deep,
                                       progress=progress)

    def human(r: dict) -> None:
        for e in r["index_errors"]:
            click.echo(f"FAILED  {e}")
        for b in r["backups"]:
            click.echo(f"{'ok    ' if b['ok'] else 'FAILED'}  {b['id']}  {b['volume_name']}"
                       + (f"  {b['error']}" if b["error"] else ""))

    app.emit(report, human)
    if not report["ok"]:
        bad = [b["id"] for b in report["backups"] if not b["ok"]]
        detail = f"backups {', '.join(bad)}" if bad else "the index"
        raise LvbackupError(f"verify found damage in {detail}")


@cli.command()
@wait_option
@pass_app
def gc(app: App, wait: float) -> None:
    """Reclaim space: delete packs no backup uses, repack mostly-unused ones.

    \b
    Example:
      lvbackup gc
    """
    from .repository.gc import collect_garbage
    lv = app.lv(wait)
    with lv.exclusive_lock(), app.progress("gc") as progress:
        engine.recover_dead_runs(lv)
        stats = collect_garbage(lv.repo, lv.config.cache_dir, lv.lock_dir, progress)

    def human(s: dict) -> None:
        click.echo(f"Deleted {s['packs_deleted']} packs, repacked {s['packs_repacked']}, "
                   f"freed {human_size(s['bytes_freed'])}")

    app.emit(stats, human)


@cli.command("export-record")
@click.argument("backup_id")
@pass_app
def export_record(app: App, backup_id: str) -> None:
    """Print a backup's catalog record as base64 text (for import-record).

    \b
    Example:
      lvbackup export-record 3f2a > 3f2a.record
    """
    click.echo(engine.export_record(app.lv(), backup_id))


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
    try:
        text = sys.stdin.read() if source == "-" else open(source).read()
    except OSError as e:
        raise UsageError(f"cannot read {source}: {e.strerror}") from None
    except UnicodeDecodeError:
        text = "\x00"
    rec = engine.import_record(app.lv(wait), text)
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
    result = engine.rebuild_catalog(app.config, wait)
    app.emit(result, lambda r: click.echo(f"Recovered {r['recovered']} backups from the repository"))


def _lv_row(lv: "lvm.LogicalVolume") -> dict:
    return {"vg": lv.vg, "name": lv.name, "full_name": lv.full_name, "uuid": lv.uuid,
            "size": lv.size, "created_at": lv.time, "origin": lv.origin or None,
            "thin": lv.is_thin, "open": lv.is_open, "active": lv.is_active, "state": lv.state}


def _print_lvs(rows: list[dict], title: str) -> None:
    table = new_table(title=title)
    for col in ("name", "uuid", "size", "origin", "created (UTC)", "state", "open"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["full_name"], r["uuid"], human_size(r["size"]), r["origin"] or "-",
                      (r["created_at"] or "")[:19].replace("T", " "), r["state"],
                      "yes" if r["open"] else "no")
    out_console().print(table)


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
    origin = lvm.find_lv(volume)
    if origin.is_snapshot:
        raise UsageError(f"{origin.full_name} is a snapshot; snapshot its origin instead")
    from .timeutil import utcnow
    snap = lvm.create_snapshot(origin, name or f"{origin.name[:100]}-snap-"
                               f"{utcnow():%Y%m%dT%H%M%S}", size)
    app.emit(_lv_row(snap), lambda r: click.echo(f"Created snapshot {r['full_name']} ({r['uuid']})"))


@snapshot.command("list")
@click.argument("volume", metavar="[VG/LV]", required=False)
@pass_app
def snapshot_list(app: App, volume: str | None) -> None:
    """List snapshots (of one volume, or all).

    \b
    Example:
      lvbackup snapshot list vg0/data
    """
    if volume:
        origin = lvm.find_lv(volume)
        snaps = [s for s in lvm.list_lvs(origin.vg) if s.origin == origin.name]
    else:
        snaps = [s for s in lvm.list_lvs() if s.is_snapshot]
    snaps.sort(key=lambda s: (s.vg, s.time, s.name))
    app.emit([_lv_row(s) for s in snaps], lambda rows: _print_lvs(rows, "snapshots"))


@snapshot.command("delete")
@click.argument("snap", metavar="VG/SNAP")
@pass_app
def snapshot_delete(app: App, snap: str) -> None:
    """Delete a snapshot (its backups are kept).

    \b
    Example:
      lvbackup snapshot delete vg0/data-0300
    """
    target = lvm.find_lv(snap)
    if not target.is_snapshot:
        raise UsageError(f"{target.full_name} is not a snapshot; lvbackup deletes only snapshots")
    lvm.remove_lv(target)
    app.emit(_lv_row(target), lambda r: click.echo(f"Deleted snapshot {r['full_name']}"))


@cli.command()
@pass_app
def volumes(app: App) -> None:
    """List logical volumes with their snapshots and each one's last backup.

    \b
    Example:
      lvbackup volumes
    """
    from .catalog import to_record
    lvs = lvm.list_lvs()
    last: dict[tuple[str, str | None], BackupRecord] = {}
    for row in app.lv().catalog.list(status=Status.AVAILABLE):
        last[(row["volume_id"], row["snapshot_id"])] = to_record(row)
    out = []
    for v in sorted((x for x in lvs if not x.is_snapshot and x.segtype != "thin-pool"),
                    key=lambda x: x.full_name):
        snaps = [s for s in lvs if s.vg == v.vg and s.origin == v.name]
        out.append({**_lv_row(v), "last_backup": last.get((v.uuid, None)),
                    "snapshots": [{**_lv_row(s), "last_backup": last.get((v.uuid, s.uuid))}
                                  for s in sorted(snaps, key=lambda s: s.time)]})

    def human(rows: list[dict]) -> None:
        table = new_table()
        for col in ("volume / snapshot", "size", "created (UTC)", "state", "last backup"):
            table.add_column(col, overflow="fold")
        for r in rows:
            for item, label in [(r, r["full_name"])] + [(s, "  └ " + s["name"]) for s in r["snapshots"]]:
                b = item["last_backup"]
                table.add_row(label, human_size(item["size"]),
                              (item["created_at"] or "")[:19].replace("T", " "), item["state"],
                              f"{b['id'][:8]} {b['created_at'][:19].replace('T', ' ')}" if b else "-")
        out_console().print(table)

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
    found is reported as a warning.

    \b
    Example:
      lvbackup --config ./lvbackup.yaml config check
    """
    import shutil

    import yaml

    config = app.config
    for n, hook in enumerate(config.hooks):
        exe = hook.command[0]
        found = (os.access(exe, os.X_OK) if "/" in exe else shutil.which(exe) is not None)
        if not found:
            app.warn(f"hooks[{n}].command: {exe} is not an executable (the hook will fail)")
    app.emit(as_dict(config),
             lambda d: click.echo(yaml.safe_dump(d, sort_keys=False, default_flow_style=False),
                                  nl=False))


# --- entry point ---------------------------------------------------------------------------

class Terminated(SystemExit):
    """SIGTERM: unwinding through every finally, then exiting 128 + the signal number."""


def _on_signal(signum: int, _frame) -> None:
    # Unwind through every finally: temporary snapshots are removed, rows marked error.
    raise Terminated(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _on_signal)
    tune_malloc()
    verbose = "-v" in sys.argv[1:] or "--verbose" in sys.argv[1:]
    try:
        code = cli.main(prog_name="lvbackup", standalone_mode=False)
    except click.ClickException as e:
        click.echo(f"lvbackup: error: {e.format_message()}", err=True)
        code = e.exit_code if e.exit_code else EXIT_USAGE
    except click.exceptions.Abort:
        click.echo("lvbackup: interrupted", err=True)
        code = 130
    except LvbackupError as e:
        click.echo(f"lvbackup: error: {e}", err=True)
        code = e.exit_code
    except KeyboardInterrupt:
        click.echo("lvbackup: interrupted", err=True)
        code = 130
    except BrokenPipeError:
        code = EXIT_FAILED
    except Terminated as e:  # from _on_signal: the work was stopped and cleaned up
        click.echo(f"lvbackup: terminated by signal {(e.code or 0) - 128}", err=True)
        code = e.code if isinstance(e.code, int) else EXIT_FAILED
    except SystemExit as e:  # click's own exits (shell completion, --help, --version)
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_FAILED)
    except Exception as e:  # noqa: BLE001 - never a traceback unless asked for
        if verbose:
            traceback.print_exc()
        click.echo(f"lvbackup: internal error: {type(e).__name__}: {e} "
                   "(rerun with --verbose for details)", err=True)
        code = EXIT_FAILED
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code if isinstance(code, int) else 0)
