"""Id prefixes: delete, protect and unprotect need at least 4 characters (a slip of one key
must not pick another backup); an ambiguous prefix names its candidates on one line."""

from __future__ import annotations

import pytest

from lvbackup.base.lifecycle import Status
from lvbackup.catalog.catalog import Catalog

from support import Workdir, assert_one_line_error, make_image


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """A repository with one real backup, and a catalog with two more rows whose ids share
    their first five characters (rows only: what is tested is how ids are resolved)."""
    root = tmp_path_factory.mktemp("prefix")
    image = root / "disk.img"
    make_image(image, 1, seed=3)
    wd = Workdir(root / "wd")
    wd.init()
    real = wd.create(image)
    head = "f" if real["id"][0] != "f" else "e"
    twins = [f"{head}abcd{n}00-0000-4000-8000-000000000000" for n in (1, 2)]
    cat = Catalog(wd.catalog)
    try:
        for twin in twins:
            cat.insert({**{k: v for k, v in real.items() if k != "has_dependent_backups"},
                        "id": twin}, Status.AVAILABLE)
    finally:
        cat.close()
    return wd, real["id"], twins


@pytest.mark.parametrize("command", ["delete", "protect", "unprotect"])
def test_a_prefix_shorter_than_four_characters_changes_nothing(twins, command):
    wd, real, _ = twins
    for short in (real[:1], real[:3]):
        assert_one_line_error(wd.run(command, short), 2, "at least 4 characters")
    row = wd.show(real)
    assert row["status"] == "available" and row["protected"] is False


@pytest.mark.parametrize("command", ["delete", "protect", "unprotect", "show"])
def test_an_ambiguous_prefix_lists_the_candidates(twins, command):
    wd, _, (one, two) = twins
    line = assert_one_line_error(wd.run(command, one[:5]), 2, "ambiguous", one, two)
    assert line.index(one) < line.index(two)
    if command != "show":
        # Too short and ambiguous: both said.
        assert_one_line_error(wd.run(command, one[:2]), 2, "at least 4", one, two)
    assert [r["status"] for r in wd.list()] == ["available"] * 3


def test_four_characters_are_enough_and_reading_commands_take_any_unique_prefix(twins):
    wd, real, _ = twins
    assert wd.show(real[:1])["id"] == real
    assert wd.run_json("protect", real[:4])["protected"] is True
    assert wd.run_json("unprotect", real[:4])["protected"] is False
