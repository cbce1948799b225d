"""lvbackup volumes and snapshot create/list/delete: the LVM side
(operations/inventory.py)."""

from __future__ import annotations

import click

from ..base.units import human_size
from ..operations.inventory import create_snapshot, delete_snapshot, list_snapshots
from ..operations.inventory import volumes as list_volumes
from . import App, command, group, pass_app
from .render import Col, print_lvs, print_table, short, when


@command()
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


@group()
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
