"""lvbackup map, unmap, mount, unmount: a backup as a block device (operations/nbd.py)."""

from __future__ import annotations

import click

from ..operations.nbd import map_backup, mount_backup
from ..operations.nbd import unmap as unmap_backup
from ..operations.nbd import unmount as unmount_backup
from . import App, command, pass_app, wait_option


@command("map")
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


@command()
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


@command("mount")
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


@command()
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
