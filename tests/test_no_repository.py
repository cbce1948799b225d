"""A configuration whose repository does not exist (never made, a typo, a disk not mounted):
every command but `init` exits 2 telling to run 'lvbackup init', and creates nothing: no
catalog, no cache directory, no repository directory."""

from __future__ import annotations

import pytest

from support import Workdir, assert_one_line_error, describe, make_image, write_config

ID = "0123abcd"


@pytest.fixture
def nowhere(tmp_path) -> tuple[Workdir, list[str]]:
    """A workdir whose repository and catalog (and so cache) do not exist, with a job and
    an image to back up."""
    image = tmp_path / "disk.img"
    make_image(image, 1, seed=1)
    state = tmp_path / "state"
    wd = Workdir(tmp_path / "wd", jobs={"nightly": {"device": str(image)}})
    wd.repo = tmp_path / "mnt" / "backups"
    wd.catalog = state / "catalog.db"
    wd.cache = state / "cache"
    wd.config = write_config(wd.path / "lvbackup.yaml", wd.repo, wd.catalog,
                             jobs={"nightly": {"device": str(image)}})
    other = write_config(tmp_path / "offsite.yaml", tmp_path / "offsite", tmp_path / "o.db")
    return wd, [str(image), str(other), str(tmp_path / "out.img")]


COMMANDS = [
    ["list"], ["list", "--status", "available"], ["list", "--mapped"], ["show", ID],
    ["create", "--device", "{image}"], ["restore", ID, "--to-file", "{out}"],
    ["restore", ID, "--to-file", "-"], ["verify"], ["verify", ID], ["verify", "--deep"],
    ["gc"], ["prune", "--keep-last", "1"], ["prune", "--keep-last", "1", "-n"],
    ["delete", ID], ["delete", ID, "--force"], ["protect", ID], ["unprotect", ID],
    ["run"], ["run", "nightly"], ["copy", "--all", "--to-config", "{other}"],
    ["copy", "--all", "--to-config", "{other}", "--init"], ["catalog", "rebuild"],
    ["key", "list"], ["key", "export"], ["export-record", ID], ["diff", ID],
    ["unmap", ID],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_every_command_on_a_missing_repository_says_run_init_and_creates_nothing(
        nowhere, argv):
    wd, (image, other, out) = nowhere
    args = [a.format(image=image, other=other, out=out) for a in argv]
    p = wd.run(*args, input="x")
    assert_one_line_error(p, 2, "run 'lvbackup init'", str(wd.repo))
    assert not wd.repo.exists() and not wd.repo.parent.exists()
    assert not wd.catalog.parent.exists(), list(wd.catalog.parent.rglob("*"))
    assert not (wd.path / "out.img").exists()


def test_config_check_validates_a_configuration_whose_repository_is_not_made_yet(nowhere):
    wd, _ = nowhere
    p = wd.run("config", "check")
    assert p.returncode == 0, describe(p)
    assert str(wd.repo) in p.stdout
    assert not wd.repo.parent.exists() and not wd.catalog.parent.exists()


def test_after_init_every_command_works_again(nowhere):
    wd, (image, *_) = nowhere
    wd.init()
    rec = wd.run_json("create", "--device", image)
    assert [b["id"] for b in wd.list()] == [rec["id"]]


def test_a_repository_that_went_away_is_refused_even_with_a_catalog(nowhere, tmp_path):
    """The disk holding the repository is not mounted: the catalog still lists backups,
    but a command that goes on would write beside the mount point."""
    wd, (image, *_) = nowhere
    wd.init()
    wd.run_json("create", "--device", image)
    wd.repo.rename(tmp_path / "unmounted")
    for argv in (["list"], ["create", "--device", image], ["gc"]):
        assert_one_line_error(wd.run(*argv), 2, "run 'lvbackup init'")
    assert not wd.repo.exists()
