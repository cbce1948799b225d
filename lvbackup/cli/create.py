"""lvbackup create: back up a volume, snapshot or device (operations/create.py)."""

from __future__ import annotations

import click

from ..base.labels import parse_labels
from ..base.units import human_size
from ..operations.create import create_backup, quiesce_of, select_source
from ..operations.groups import create_group
from . import App, command, pass_app, wait_option
from .render import print_group, print_record


@command()
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
