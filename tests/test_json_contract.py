"""One JSON contract (docs/json.md): each command's --json document has exactly the keys,
and values of the types, that lvbackup/cli/documents.py declares; a failure under --json is one
JSON line on stderr ({"error", "exit_code"}) with the exit status unchanged."""

from __future__ import annotations

import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import pytest

from lvbackup.cli import documents as doc

from support import Workdir, describe, job_and_two_backups, write_secret


def conforms(value: Any, hint: Any, where: str = "$") -> None:
    """Assert that `value` (parsed JSON) is of type `hint` (a TypedDict: exactly its keys)."""
    origin = get_origin(hint)
    if hint is Any:
        return
    if origin in (Union, types.UnionType):
        errors = []
        for option in get_args(hint):
            try:
                conforms(value, option, where)
                return
            except AssertionError as e:
                errors.append(str(e))
        raise AssertionError(f"{where}: {value!r} is none of {hint}: {errors}")
    if hint is type(None):
        assert value is None, f"{where}: {value!r} is not null"
    elif origin is Literal:
        assert value in get_args(hint), f"{where}: {value!r} not in {get_args(hint)}"
    elif typing.is_typeddict(hint):
        assert isinstance(value, dict), f"{where}: {value!r} is not an object"
        fields = get_type_hints(hint)
        required = hint.__required_keys__
        assert required <= value.keys() <= fields.keys(), \
            (f"{where}: keys {sorted(value)}; missing {sorted(required - value.keys())}, "
             f"unexpected {sorted(value.keys() - fields.keys())}")
        for key, item in value.items():
            conforms(item, fields[key], f"{where}.{key}")
    elif origin is list:
        assert isinstance(value, list), f"{where}: {value!r} is not an array"
        for i, item in enumerate(value):
            conforms(item, get_args(hint)[0], f"{where}[{i}]")
    elif origin is dict:
        assert isinstance(value, dict), f"{where}: {value!r} is not an object"
        for key, item in value.items():
            conforms(item, get_args(hint)[1], f"{where}.{key}")
    elif hint is float:
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    elif hint is int:
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r}"
    else:
        assert isinstance(value, hint), f"{where}: {value!r} is not {hint}"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """Two backups (full, incremental) of an image and a job that backs it up."""
    return job_and_two_backups(tmp_path_factory.mktemp("contract"), seed=71)


@pytest.fixture
def env(repo, tmp_path):
    wd, img, full, incr = repo
    return wd.clone(tmp_path / "wd"), img, full, incr


def shape(wd: Workdir, hint: Any, *args: Any, **kw: Any) -> Any:
    """Run `ARGS --json` (the option after the command) and check its document."""
    p = wd.run(*args, "--json", **kw)
    assert p.returncode == 0, describe(p)
    document = json.loads(p.stdout)
    conforms(document, hint)
    return document


def test_init(tmp_path):
    shape(Workdir(tmp_path), doc.Init, "init", "--block-size", "64K")


def test_create(env):
    wd, img, _, _ = env
    shape(wd, doc.Record, "create", "--device", img, "--incremental", "--label", "a=b")


def test_list_and_show(env):
    wd, _, full, incr = env
    assert len(shape(wd, list[doc.Record], "list")) == 2
    shape(wd, doc.Record, "show", incr)
    assert [r["id"] for r in shape(wd, list[doc.Record], "show", incr, "--chain")] \
        == [incr, full]
    assert shape(wd, list[doc.MapInfo], "list", "--mapped") == []


def test_restore_names_what_it_wrote(env, tmp_path):
    wd, _, full, _ = env
    out = tmp_path / "r.img"
    r = shape(wd, doc.RestoreResult, "restore", full, "--to-file", out)
    assert (r["backup_id"], r["target"], r["target_kind"], r["created"]) \
        == (full, str(out), "file", True)
    r = shape(wd, doc.RestoreResult, "restore", full, "--to-file", out, "--force")
    assert r["created"] is False and r["record"]["id"] == full
    r = shape(wd, doc.RestoreResult, "restore", full, "--to", out)
    assert (r["target"], r["target_kind"]) == (str(out), "device")
    assert shape(wd, list[doc.InstantInfo], "restore", "--status") == []


def test_delete_protect_unprotect(env):
    wd, _, _, incr = env
    assert shape(wd, doc.Record, "protect", incr)["protected"] is True
    assert shape(wd, doc.Record, "unprotect", incr)["protected"] is False
    assert shape(wd, doc.Record, "delete", incr)["status"] == "deleted"


@pytest.mark.parametrize("dry_run", [True, False])
def test_prune(env, dry_run):
    wd = env[0]
    r = shape(wd, doc.Prune, "prune", "--keep-last", "1", *(["-n"] if dry_run else []))
    assert len(r["remove"]) == 1 and ("deleted" in r) is not dry_run


def test_run(env):
    r = shape(env[0], doc.Run, "run")
    assert [j["status"] for j in r["jobs"]] == ["ok"]


def test_verify(env):
    assert shape(env[0], doc.Verify, "verify", "--deep")["ok"] is True


def test_verify_sampled(env):
    r = shape(env[0], doc.Verify, "verify", "--deep", "--sample", "50")
    assert r["cycle"]["number"] == 1 and r["chunks_checked"] <= r["chunks_total"]


def test_diff(env):
    wd, _, full, incr = env
    assert shape(wd, doc.Diff, "diff", incr)["other_id"] == full


def test_gc(env):
    wd, _, _, incr = env
    wd.run_json("delete", incr)
    shape(wd, doc.Gc, "gc")


def test_copy(env, tmp_path):
    wd, _, full, _ = env
    target = Workdir(tmp_path / "target")
    target.init("64K")
    r = shape(wd, doc.Copy, "copy", full, "--to-config", target.config)
    assert r["copied"] == [full]


def test_export_and_import_record(env, tmp_path):
    wd, _, full, _ = env
    r = shape(wd, doc.ExportedRecord, "export-record", full)
    assert r["backup_id"] == full
    p = wd.run("export-record", full)
    assert p.stdout.strip() == r["record"], describe(p)
    assert shape(wd, doc.Rebuild, "catalog", "rebuild")["recovered"] == 2
    record = tmp_path / "r.txt"
    record.write_text(r["record"])
    fresh = Workdir(tmp_path / "fresh", repository=wd.repo)   # the repository, no catalog
    assert shape(fresh, doc.Record, "import-record", record)["id"] == full


def test_config_check(env):
    assert env[0].run_json("config", "check")["repository"] == str(env[0].repo)


def test_key_commands(tmp_path):
    write_secret(tmp_path / "pass", "a passphrase of some length")
    wd = Workdir(tmp_path / "wd", passphrase_file=str(tmp_path / "pass"))
    assert shape(wd, doc.Init, "init", "--block-size", "64K", "--encryption")["encrypted"]
    shape(wd, list[doc.KeySlot], "key", "list")
    new = {"LVBACKUP_NEW_PASSPHRASE": "another passphrase"}
    shape(wd, doc.KeyAdded, "key", "add", env=new)
    export = tmp_path / "key.txt"
    assert shape(wd, doc.KeyExported, "key", "export", "--to", export)["exported_to"] \
        == str(export)
    shape(wd, doc.KeyImported, "key", "import", export)
    write_secret(tmp_path / "new", "a third passphrase")
    shape(wd, doc.PassphraseChanged, "key", "change-passphrase", "--new-passphrase-file",
          tmp_path / "new")


@pytest.mark.parametrize("place", ["before", "after"])
def test_a_failure_under_json_is_one_json_line(env, place):
    wd = env[0]
    args = ["show", "ffffffff"]
    args = ["--json", *args] if place == "before" else [*args, "--json"]
    p = wd.run(*args)
    assert p.returncode == 2 and p.stdout == "", describe(p)
    (line,) = p.stderr.splitlines()
    error = json.loads(line)
    conforms(error, doc.Error)
    assert error["exit_code"] == 2 and "ffffffff" in error["error"]


def test_a_usage_error_under_json_is_one_json_line(env):
    p = env[0].run("list", "--json", "--no-such-option")
    assert p.returncode == 2, describe(p)
    conforms(json.loads(p.stderr), doc.Error)


def test_documents_are_all_documented():
    """Every document type of documents.py has its section in docs/json.md."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "json.md").read_text()
    for name in dir(doc):
        hint = getattr(doc, name)
        if typing.is_typeddict(hint):
            assert f"`{name}`" in text, f"docs/json.md does not describe {name}"
