"""Rendering for people: plain key/value records and rich tables on stdout, warnings
on stderr. (JSON output needs none of this.)"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import click

from .catalog import BackupRecord
from .units import human_size

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

# rich is imported only where it renders something: most runs (cron, scripts, --json,
# --quiet) never do, and its import is a sixth of the start-up time.

@functools.cache
def err_console() -> Console:
    from rich.console import Console
    return Console(stderr=True, highlight=False)


def out_console() -> Console:
    """Rich output on stdout. Not on a terminal (cron mail, a pipe, a log file), tables get
    room to stay readable instead of rich's default 80 columns."""
    from rich.console import Console
    wide = not sys.stdout.isatty() and not os.environ.get("COLUMNS")
    return Console(width=160 if wide else None)


def new_table(**options: Any) -> Table:
    from rich.table import Table
    return Table(**options)


_SHOW_FIELDS = ("id", "name", "description", "status", "fail_reason", "volume_name", "volume_id",
                "snapshot_name", "snapshot_id", "parent_id", "is_incremental", "data_timestamp",
                "created_at", "updated_at", "size", "block_size", "stored_bytes",
                "num_dependent_backups", "has_dependent_backups")


def labels_text(labels: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((labels or {}).items()))


def when(ts: str | None) -> str:
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
            value = labels_text(value) or None
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
                          when(r["data_timestamp"]), human_size(r["size"]),
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
        table.add_row(r["id"][:8], r["volume_name"] or "",
                      "incr" if r["is_incremental"] else "full",
                      status, when(r["data_timestamp"]),
                      human_size(r["size"]), human_size(r["stored_bytes"]),
                      (r["parent_id"] or "-")[:8], str(r["num_dependent_backups"]),
                      r["name"] or "", labels_text(r.get("labels")))
    out_console().print(table)


def print_maps(rows: list[dict]) -> None:
    """`list --mapped`: one row per map; a dead one (its server killed) awaits `unmap`."""
    table = new_table()
    for col in ("device", "backup", "volume", "mode", "state", "mounted on", "since (UTC)"):
        table.add_column(col, overflow="fold")
    for r in rows:
        instant = r.get("instant_volume")
        table.add_row(r["device"] or "-", r["backup_id"], r["volume_name"] or "-",
                      f"instant restore onto {instant}" if instant
                      else "writable" if r["writable"] else "read-only",
                      "serving" if r["alive"] else "stopped: restore --resume" if instant
                      else "dead: unmap it",
                      ", ".join(r["mountpoints"]) or "-", when(r["started_at"]))
    out_console().print(table)


def print_instant(rows: list[dict]) -> None:
    """`restore --status`: one row per instant restore."""
    table = new_table()
    for col in ("volume", "device", "backup", "hydrated", "of", "state"):
        table.add_column(col, overflow="fold")
    for r in rows:
        total = r["total_bytes"]
        percent = r["hydrated_bytes"] * 100 // total if total else 100
        state = (f"cancelling: restore --cancel {r['volume']}" if r["cancelling"]
                 else "done, released" if r["released"]
                 else f"done: restore --release {r['volume']}" if r["done"]
                 else f"copying ({percent}%)" if r["running"]
                 else f"stopped ({percent}%): restore --resume {r['volume']}")
        if r["error"] and not r["done"]:
            state += f"; {r['error']}"
        table.add_row(r["volume"], r["device"], r["backup_id"], human_size(r["hydrated_bytes"]),
                      human_size(total), state)
    out_console().print(table)


def print_lvs(rows: list[dict], title: str) -> None:
    table = new_table(title=title)
    for col in ("name", "uuid", "size", "origin", "created (UTC)", "state", "open"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["full_name"], r["uuid"], human_size(r["size"]), r["origin"] or "-",
                      (r["created_at"] or "")[:19].replace("T", " "), r["state"],
                      "yes" if r["open"] else "no")
    out_console().print(table)
