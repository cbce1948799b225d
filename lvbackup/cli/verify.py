"""lvbackup verify: check backups, exit 3 on damage (operations/verify.py)."""

from __future__ import annotations

from fractions import Fraction

import click

from ..base.errors import CorruptionError
from ..base.timeutil import parse_duration
from ..operations.verify import verify_backups
from . import App, command, pass_app, wait_option
from .render import count


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


@command()
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
        for o in r["overwritten"]:
            click.echo(f"FAILED  {o['object']} was overwritten at {o['overwritten_at']}, not "
                       "by lvbackup (an attack?)")
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
                  else "the index" if report["index_errors"] else "the repository")
        if report["overwritten"]:
            detail += (f" ({count(len(report['overwritten']), 'object')} overwritten behind "
                       "lvbackup's back: see docs/security.md)")
        raise CorruptionError(f"verify found damage in {detail}")
