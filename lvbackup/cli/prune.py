"""lvbackup prune: retention (retention.py's Policy, operations/prune.py)."""

from __future__ import annotations

import click

from ..base.errors import UsageError
from ..base.labels import parse_labels
from ..catalog.retention import Policy
from ..operations.prune import prune as prune_backups
from . import App, command, label_option, pass_app, wait_option
from .render import Col, count, print_table, short, when


def _keep_option(kind: str, what: str):
    return click.option(f"--keep-{kind}", kind, type=click.IntRange(min=0), default=0,
                        metavar="N", help=f"Keep {what}.")


@command()
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
