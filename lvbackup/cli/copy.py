"""lvbackup copy: backups into another repository (operations/copy.py)."""

from __future__ import annotations

from pathlib import Path

import click

from ..base.units import human_size
from ..operations.copy import copy_backups
from . import App, command, pass_app, wait_option
from .render import count


@command()
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
