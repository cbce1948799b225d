"""Rendering for people: plain key/value records and tables on stdout, warnings (rich)
on stderr. (JSON output needs none of this.)"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import click

from ..base.units import human_size
from ..catalog.catalog import BackupRecord

if TYPE_CHECKING:
    from rich.console import Console

# rich is imported only where it renders something (warnings): most runs (cron, scripts,
# --json, --quiet) never do, and its import is a sixth of the start-up time.

@functools.cache
def err_console() -> Console:
    from rich.console import Console
    return Console(stderr=True, highlight=False)


@dataclass(frozen=True)
class Col:
    """A table column. `keep`: the columns with the lowest are dropped first when the
    table does not fit. `shape`: "word" (ids, statuses, sizes, times: never broken nor
    cut), "path" (cut from the left: the end of a path tells most) or "text" (cut from
    the right)."""

    header: str
    keep: int
    shape: Literal["word", "path", "text"] = "word"


_ELLIPSIS = "…"
_MIN_CUT = 12     # a path or text column is never cut narrower than this


def fit_columns(cols: list[Col], rows: list[list[str]], width: int
                ) -> tuple[list[int], list[int]]:
    """(indexes of the columns shown, their widths) for a table `width` characters wide
    (columns are separated by two spaces): the least kept columns are dropped while even
    their narrowest does not fit, then paths and texts are narrowed, widest first."""
    natural = [max([len(c.header)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    narrowest = [n if c.shape == "word" else min(n, max(len(c.header), _MIN_CUT))
                 for c, n in zip(cols, natural, strict=True)]
    shown = list(range(len(cols)))

    def overflow(widths: list[int]) -> int:
        return sum(widths[i] for i in shown) + 2 * (len(shown) - 1) - width

    while len(shown) > 1 and overflow(narrowest) > 0:
        shown.remove(min(shown, key=lambda i: cols[i].keep))
    widths = list(natural)
    while overflow(widths) > 0:
        cuttable = [i for i in shown if widths[i] > narrowest[i]]
        if not cuttable:
            break
        widest = max(cuttable, key=lambda i: widths[i])
        widths[widest] -= 1
    return shown, [widths[i] for i in shown]


def cut(text: str, width: int, shape: str) -> str:
    if len(text) <= width:
        return text
    if shape == "path":
        return _ELLIPSIS + text[len(text) - width + 1:]
    return text[:width - 1] + _ELLIPSIS


def table_width() -> int:
    """The width tables fit: $COLUMNS, else the terminal's; not on a terminal (cron mail, a
    pipe, a log file), 160, so that tables stay readable."""
    try:
        return max(int(os.environ.get("COLUMNS", "")), 20)
    except ValueError:
        pass
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return 160


def print_table(cols: list[Col], rows: list[list[str]], title: str | None = None) -> None:
    """A table that fits the terminal (or COLUMNS): nothing is wrapped; columns that do
    not fit are dropped (one line names them), paths and texts are cut. Plain padded text
    (a bold header on a terminal), written at once: `list` prints ten thousand rows in a
    fraction of a second, where measuring every cell with rich cost a second per 1,600."""
    width = table_width()
    shown, widths = fit_columns(cols, rows, width)
    pairs = list(zip(shown, widths, strict=True))

    def line(cells: list[str]) -> str:
        return "  ".join(cut(cells[i], w, cols[i].shape).ljust(w) for i, w in pairs).rstrip()

    out = []
    if title:
        out.append(title)
    out.append(click.style(line([c.header for c in cols]), bold=True))
    out.extend(line(r) for r in rows)
    click.echo("\n".join(out))
    dropped = [c.header for i, c in enumerate(cols) if i not in shown]
    if dropped:
        click.echo(f"(left out to fit {width} columns: {', '.join(dropped)})")


_SHOW_FIELDS = ("id", "name", "description", "status", "fail_reason", "volume_name", "volume_id",
                "snapshot_name", "snapshot_id", "parent_id", "is_incremental", "data_timestamp",
                "created_at", "updated_at", "size", "block_size", "stored_bytes",
                "num_dependent_backups", "has_dependent_backups")


def count(n: int, noun: str) -> str:
    """'1 backup', '2 backups' (nouns whose plural takes an s)."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def labels_text(labels: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((labels or {}).items()))


def when(ts: str | None) -> str:
    return (ts or "")[:19].replace("T", " ")


def print_record(rec: Mapping[str, Any]) -> None:
    """Key and value per line: plain text (no rich), since `create` ends with it."""
    keys = _SHOW_FIELDS + (("group_id", "group_name") if rec.get("group_id") else ()) + (
        "labels", "protected")
    width = max(map(len, keys))
    for key in keys:
        value = rec.get(key)
        if key in ("size", "stored_bytes") and value is not None:
            value = f"{human_size(value)} ({value} bytes)"
        elif key == "labels":
            value = labels_text(value) or None
        click.echo(f"{key:<{width}}  {'-' if value is None else value}")


def short(backup_id: str | None) -> str:
    """A backup id as tables show it: its first 8 characters (any unique prefix is
    accepted where an id is asked for)."""
    return (backup_id or "-")[:8]


NEAREST = 5   # the backups of a long chain `show` prints before the full backup


def print_lineage(rec: BackupRecord, chain: list[BackupRecord],
                  dependents: list[BackupRecord]) -> None:
    """A backup's record, the chain of parents back to its full backup (a long one as its
    NEAREST first backups, how many more, and the full backup), and its children."""
    print_record(rec)
    if len(chain) > 1 or rec.get("parent_id"):
        cols = [Col("id", 10), Col("kind", 5), Col("status", 9), Col("data timestamp (UTC)", 8),
                Col("size", 6), Col("stored", 4), Col("name", 1, "text")]

        def row(r: BackupRecord) -> list[str]:
            return [short(r["id"]), "incr" if r["is_incremental"] else "full", r["status"],
                    when(r["data_timestamp"]), human_size(r["size"]),
                    human_size(r["stored_bytes"]), r["name"] or ""]

        rows = [row(r) for r in chain[:NEAREST]]
        if len(chain) > NEAREST + 1:
            rows.append(["…", "", "", "", "", "", f"... {len(chain) - NEAREST - 1} more ..."])
        if len(chain) > NEAREST:
            rows.append(row(chain[-1]))
        last = chain[-1]
        if last.get("is_incremental") and last.get("parent_id"):
            rows.append([short(last["parent_id"]), "?", "missing", "", "", "", ""])
        length = count(len(chain), "backup")
        print_table(cols, rows, title=f"chain back to the full backup: {length}")
    if dependents:
        click.echo("dependents: " + ", ".join(d["id"] for d in dependents))


def print_records(recs: list[dict]) -> None:
    cols = [Col("id", 10), Col("volume", 9, "path"), Col("kind", 5), Col("status", 9),
            Col("data timestamp (UTC)", 8), Col("size", 6), Col("stored", 4),
            Col("parent", 3), Col("deps", 2), Col("name", 1, "text"), Col("labels", 0, "text")]
    rows = [[short(r["id"]), r["volume_name"] or "", "incr" if r["is_incremental"] else "full",
             r["status"] + (" (protected)" if r.get("protected") else ""),
             when(r["data_timestamp"]), human_size(r["size"]), human_size(r["stored_bytes"]),
             short(r["parent_id"]), str(r["num_dependent_backups"]), r["name"] or "",
             labels_text(r.get("labels"))] for r in recs]
    print_table(cols, rows)


def print_group(group: dict) -> None:
    """A group backup: its id and name, then its members."""
    click.echo(f"group {group['name']}  {group['group_id']}  "
               f"({count(len(group['backups']), 'backup')})")
    print_records(group["backups"])


def print_maps(rows: list[dict]) -> None:
    """`list --mapped`: one row per map; a dead one (its server killed) awaits `unmap`."""
    cols = [Col("device", 10), Col("backup", 9), Col("volume", 5, "path"),
            Col("mode", 6, "text"), Col("state", 8, "text"), Col("mounted on", 7, "path"),
            Col("since (UTC)", 3)]
    table = []
    for r in rows:
        instant = r.get("instant_volume")
        table.append([r["device"] or "-", short(r["backup_id"]), r["volume_name"] or "-",
                      f"instant restore onto {instant}" if instant
                      else "writable" if r["writable"] else "read-only",
                      "serving" if r["alive"] else "stopped: restore --resume" if instant
                      else "dead: unmap it",
                      ", ".join(r["mountpoints"]) or "-", when(r["started_at"])])
    print_table(cols, table)


def print_instant(rows: list[dict]) -> None:
    """`restore --status`: one row per instant restore."""
    cols = [Col("volume", 10, "path"), Col("device", 8), Col("backup", 7), Col("hydrated", 6),
            Col("of", 5), Col("state", 9, "text")]
    table = []
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
        table.append([r["volume"], r["device"], short(r["backup_id"]),
                      human_size(r["hydrated_bytes"]), human_size(total), state])
    print_table(cols, table)


def print_lvs(rows: list[dict], title: str) -> None:
    cols = [Col("name", 10, "path"), Col("uuid", 3), Col("size", 8), Col("origin", 6, "path"),
            Col("created (UTC)", 5), Col("state", 7, "text"), Col("open", 4)]
    print_table(cols, [[r["full_name"], r["uuid"], human_size(r["size"]), r["origin"] or "-",
                        when(r["created_at"]), r["state"], "yes" if r["open"] else "no"]
                       for r in rows], title=title)
