"""Tables that fit: `list`, `run` and `prune -n` at 80 and 120 columns (rich honours
COLUMNS): no line wider, ids of 8 characters never broken, words never broken, the columns
left out named in one line, paths cut from the left; the progress bar on one line."""

from __future__ import annotations

import io
import re

import pytest

from lvbackup.cli.progressbar import columns
from lvbackup.cli.render import Col, cut, fit_columns

from support import Workdir, describe, make_image

LONG = "/srv/images/a-rather-long-directory-name/for-virtual-machines/web-frontend-01.img"


@pytest.fixture(scope="module")
def wd(tmp_path_factory):
    """Backups of an image with a long path, long names and labels, and a job."""
    root = tmp_path_factory.mktemp("tables")
    img = root / LONG.lstrip("/")
    img.parent.mkdir(parents=True)
    make_image(img, 2, seed=91)
    wd = Workdir(root / "wd", jobs={"a-job-with-a-rather-long-name": {
        "device": str(img), "incremental": True}})
    wd.init("64K")
    ids = [wd.create(img, *(["--incremental"] if n else []), "--name",
                     f"the nightly backup of the web frontend, number {n}",
                     "--label", "tier=gold", "--label", "owner=web-team")["id"]
           for n in range(3)]
    wd.run_json("protect", ids[0])
    return wd, img, ids


def lines_of(wd: Workdir, width: int, *args: str) -> list[str]:
    p = wd.run(*args, env={"COLUMNS": str(width)})
    assert p.returncode == 0, describe(p)
    return p.stdout.splitlines()


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("args", [("list",), ("run",), ("prune", "--keep-last", "1", "-n")],
                         ids=" ".join)
def test_tables_fit_and_never_break_an_id(wd, width, args):
    wd, img, ids = wd
    lines = lines_of(wd, width, *args)
    assert lines, "no output"
    for line in lines:
        assert len(line) <= width, f"{len(line)} > {width}: {line!r}"
    text = "\n".join(lines)
    if args[0] != "run":
        for bid in ids:
            # the id is shown whole (8 characters), on one line
            assert any(bid[:8] in line for line in lines), (bid, text)
    for word in ("available", "protected", "would delete", "incr"):
        # a word is whole or absent, never split over two lines
        for part in range(2, len(word)):
            head, tail = word[:part], word[part:]
            assert not any(line.rstrip().endswith(head) and nxt.lstrip().startswith(tail)
                           for line, nxt in zip(lines, lines[1:], strict=False)), text


def test_list_at_80_columns_names_the_columns_left_out(wd):
    wd, img, ids = wd
    lines = lines_of(wd, 80, "list")
    assert lines[0].split()[:3] == ["id", "volume", "status"], lines
    assert lines[-1].startswith("(left out to fit 80 columns: ") and "labels" in lines[-1]
    rows = [line for line in lines if line[:8] in {i[:8] for i in ids}]
    assert len(rows) == 3 and all("available (protected)" in r for r in rows[:1]), lines


def test_list_cuts_paths_from_the_left(wd):
    wd, img, ids = wd
    lines = lines_of(wd, 120, "list")
    row = next(line for line in lines if line.startswith(ids[0][:8]))
    assert "…" in row and "frontend-01.img" in row, row


def test_fit_columns_drops_the_least_kept_first():
    cols = [Col("id", 10), Col("path", 9, "path"), Col("note", 1, "text"), Col("n", 5)]
    rows = [["0123abcd", "/a/very/long/path/to/some/image.img", "a note " * 10, "42"]]
    shown, widths = fit_columns(cols, rows, 36)
    assert [cols[i].header for i in shown] == ["id", "path", "n"]
    assert sum(widths) + 2 * (len(shown) - 1) <= 36
    assert cut(rows[0][1], 11, "path") == "…/image.img"
    assert cut("a long text", 6, "text") == "a lon…"


@pytest.mark.parametrize("width", [80, 120, 200])
def test_progress_bar_fits_on_one_line(width):
    from rich.console import Console
    from rich.progress import Progress

    console = Console(file=io.StringIO(), width=width, force_terminal=True)
    bar = Progress(*columns("restore", width), console=console)
    task = bar.add_task("restore", total=1023 << 30,
                        extra="new 1023.9 GiB, stored 1023.9 GiB")
    bar.update(task, completed=1000 << 30)
    console.print(bar.make_tasks_table(bar.tasks))
    out = console.file.getvalue()
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in out.splitlines()]
    assert len(lines) == 1 and len(lines[0]) <= width, lines
    assert ("stored" in lines[0]) is (width >= 120), lines
