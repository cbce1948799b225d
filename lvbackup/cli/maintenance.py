"""lvbackup init, gc, catalog rebuild: the repository and the catalog
(operations/maintenance.py)."""

from __future__ import annotations

import click

from ..base.units import human_size
from ..operations.maintenance import collect_garbage, init_repository, rebuild_catalog
from . import App, command, group, parse_size, pass_app, wait_option
from .render import count


@command()
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


@command()
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
        if s["locked_objects_held"]:
            click.echo(f"Object Lock still holds {count(s['locked_objects_held'], 'object')} "
                       f"({human_size(s['locked_bytes_held'])}) until {s['locked_until']}")

    app.emit(stats, human)


@group()
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
