"""lvbackup run: the configuration's jobs (operations/jobs.py)."""

from __future__ import annotations

import click

from ..base.errors import LvbackupError
from ..base.units import human_size
from ..operations.jobs import run_jobs
from . import App, command, pass_app, wait_option
from .render import Col, count, print_table, short


@command("run")
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
