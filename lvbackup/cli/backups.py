"""lvbackup list, show, delete, protect, unprotect, diff, export-record, import-record:
the backup records (operations/records.py, delete.py, diff.py)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

from ..base.errors import NotFoundError
from ..base.labels import parse_labels
from ..base.units import human_size
from ..catalog.catalog import STATUSES
from ..operations.delete import delete_backup
from ..operations.diff import diff_backups
from ..operations.groups import delete_group, one_group
from ..operations.records import export_record as export_backup_record
from ..operations.records import import_record as import_backup_record
from ..operations.records import list_backups, set_protected, show_backup
from . import App, command, label_option, pass_app, read_text_input, wait_option
from .render import count, print_group, print_lineage, print_maps, print_records

if TYPE_CHECKING:
    from .documents import ExportedRecord


@command("list")
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
        # The NBD side is imported only here: a plain list need not pay for it.
        from ..operations.nbd import mapped_backups
        app.emit(mapped_backups(app.session()), print_maps)
        return
    app.emit(list_backups(app.session(), volume, status, parse_labels(labels), group),
             print_records)


@command()
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


@command()
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


@command()
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


@command()
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


@command()
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


@command("export-record")
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


@command("import-record")
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
