"""Every test the documentation cites exists: a claim backed by a test that was renamed or
removed is a claim nothing checks any more.

README.md and docs/*.md cite tests as `tests/test_x.py::test_name`, `test_x.py::test_name`
(the file under tests/ or tests/lvm/), `lvm/test_x.py::test_name`, or `::test_name` for
another test of the file cited last; a parametrized case carries its ids in brackets
(`::test_name[a|b]`), which name no function and are left aside. A file alone
(`tests/test_x.py`, `test_x.py`) cites the file, and is the one a following `::` means.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from lvbackup.base import errors

from support import LVBACKUP, clean_env

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

# An optional file (with or without tests/, maybe lvm/), then ::name; or a file alone.
CITATION = re.compile(
    r"(?P<file>(?:tests/)?(?:lvm/)?test_\w+\.py)?::(?P<name>test_\w+)"
    r"|(?P<bare>(?:tests/)?(?:lvm/)?test_\w+\.py)")


def resolve(cited: str) -> Path:
    """The test file a citation names: as written under tests/, else under tests/lvm/."""
    rel = cited.removeprefix("tests/")
    found = ROOT / "tests" / rel
    return found if found.exists() else ROOT / "tests" / "lvm" / rel


def citations(doc: Path) -> list[tuple[str, Path, str | None]]:
    """(where, test file, function name or None for the file alone) of each citation."""
    out: list[tuple[str, Path, str | None]] = []
    current: Path | None = None
    text = doc.read_text()
    for m in CITATION.finditer(text):
        where = f"{doc.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
        if m["bare"]:
            current = resolve(m["bare"])
            out.append((where, current, None))
            continue
        if m["file"]:
            current = resolve(m["file"])
        assert current is not None, f"{where}: ::{m['name']} follows no test file"
        out.append((where, current, m["name"]))
    return out


ALL = [c for doc in DOCS for c in citations(doc)]


def test_the_docs_cite_tests():
    """The parser finds the citations (a regex gone wrong would pass everything below)."""
    assert len(ALL) > 100
    assert any(name == "test_flipped_byte_inside_a_chunk" for _, _, name in ALL)


@pytest.mark.parametrize(("where", "path", "name"), ALL,
                         ids=[f"{w}:{n or p.name}" for w, p, n in ALL])
def test_every_cited_test_exists(where: str, path: Path, name: str | None):
    assert path.is_file(), f"{where} cites {path.relative_to(ROOT)}, which does not exist"
    if name is not None:
        defined = re.search(rf"^\s*(?:async\s+)?def {name}\(", path.read_text(), re.MULTILINE)
        assert defined, f"{where} cites {name}, which {path.relative_to(ROOT)} does not define"


def test_help_and_the_docs_say_what_each_exit_status_means():
    """`lvbackup --help` lists every status errors.py defines; README.md, the user guide and
    docs/operations.md say which one is damage (3), for scripts to tell it from a failure."""
    codes = sorted(v for k, v in vars(errors).items() if k.startswith("EXIT_"))
    assert 3 in codes
    p = subprocess.run([str(LVBACKUP), "--help"], capture_output=True, text=True,
                       env=clean_env(), timeout=60)
    assert p.returncode == 0, p.stderr
    for code in codes:
        assert re.search(rf"^ +{code} +\w", p.stdout, re.MULTILINE), f"--help omits {code}"
    assert re.search(r"^ +3 +damage", p.stdout, re.MULTILINE)
    for doc in ("README.md", "docs/user-guide.md", "docs/operations.md"):
        text = " ".join((ROOT / doc).read_text().split())
        assert re.search(r"\b3\b[ |]*damage found", text), f"{doc} does not name exit 3"
