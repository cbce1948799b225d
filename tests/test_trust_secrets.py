"""Attacks on the trust an encrypted repository's secrets carry, each reproduced first:
storage that swaps in an unencrypted config to be sent plaintext, a long-lived helper that
keeps the secrets in its environment, secret files and repository directories others can
reach, passphrases too short for any KDF to save, and an append-only bucket whose objects
the host's credentials can still overwrite."""

from __future__ import annotations

import json
import os
import shutil
import signal
import uuid
from pathlib import Path

import pytest
from nbdclient import NbdClient
from s3server import ACCESS_KEY, SECRET_KEY
from test_events import _hook_script
from test_mapping import _start

from lvbackup.repository import keys
from lvbackup.repository.codec import seal, unseal
from lvbackup.repository.keys import PASSPHRASE, Secret, make_slot, parse_slot
from lvbackup.repository.repo import REPO_MAGIC, Repository

from support import (
    Workdir,
    assert_one_line_error,
    describe,
    make_image,
    s3_section,
    write_secret,
)

SECRET = "correct horse battery staple"
ENV = {"LVBACKUP_PASSPHRASE": SECRET}
TARGET_ENV = {"LVBACKUP_TARGET_PASSPHRASE": SECRET}
# Every variable a hook or helper must not see, with values to look for.
SECRETS = {"LVBACKUP_PASSPHRASE": SECRET, "LVBACKUP_TARGET_PASSPHRASE": "target secret 1",
           "LVBACKUP_NEW_PASSPHRASE": "new secret 22", "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE4",
           "AWS_SECRET_ACCESS_KEY": "aws secret 333", "AWS_SESSION_TOKEN": "session 4444"}


def encrypted_by_env(path: Path, **extra) -> Workdir:
    """A Workdir whose encrypted repository's passphrase is given only by the environment
    (the usual cron set-up): its configuration names no secret."""
    wd = Workdir(path, **extra)
    assert wd.run_json("init", "--block-size", "64K", "--encryption", env=ENV)["encrypted"]
    return wd


def downgrade(repo: Path, new_id: bool = False) -> None:
    """What anyone who can write the storage can do without a key: put an unencrypted
    config in place of the encrypted one, re-sealed, under the same id (or a new one)."""
    config = repo / "config"
    meta = json.loads(unseal(REPO_MAGIC, config.read_bytes(), "config"))
    plain = {"version": 1, "id": str(uuid.uuid4()) if new_id else meta["id"],
             "block_size": meta["block_size"], "created_at": meta["created_at"]}
    config.unlink()
    config.write_bytes(seal(REPO_MAGIC, json.dumps(plain).encode()))


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under `path`: (size, mtime), to show that nothing was written."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file()}


# --- 1. a downgraded repository never receives plaintext ----------------------------------

def test_a_passphrase_from_the_environment_refuses_a_downgraded_repository(tmp_path):
    wd = encrypted_by_env(tmp_path / "a")
    make_image(tmp_path / "img", 2, seed=1)
    wd.run_json("create", "--device", tmp_path / "img", env=ENV)
    shutil.rmtree(wd.cache)    # a host that never opened it: only the secret can tell
    downgrade(wd.repo)
    before = tree(wd.repo)
    p = wd.run("create", "--device", tmp_path / "img", env=ENV)
    assert_one_line_error(p, 2, "not encrypted", "$LVBACKUP_PASSPHRASE")
    assert SECRET not in p.stderr
    assert tree(wd.repo) == before, "something was written to the downgraded repository"
    # Nor is a plaintext repository made where a secret is given.
    fresh = Workdir(tmp_path / "fresh")
    assert_one_line_error(fresh.run("init", "--block-size", "64K", env=ENV), 2,
                          "$LVBACKUP_PASSPHRASE", "--encryption")
    assert not fresh.repo.exists()


@pytest.mark.parametrize("new_id", [False, True], ids=["same-id", "new-id"])
def test_a_host_that_used_a_repository_encrypted_refuses_it_downgraded(tmp_path, new_id):
    """No secret given at all: what this host remembers (the id, and where it was) is what
    refuses it."""
    wd = encrypted_by_env(tmp_path / "a")
    make_image(tmp_path / "img", 2, seed=2)
    wd.run_json("create", "--device", tmp_path / "img", env=ENV)
    (marker,) = wd.cache.glob("encrypted-*")
    assert marker.stat().st_mode & 0o777 == 0o600
    downgrade(wd.repo, new_id)
    before = tree(wd.repo)
    for args in (["create", "--device", tmp_path / "img"], ["verify"]):
        p = wd.run(*args)
        line = assert_one_line_error(p, 2, "not encrypted", "used it encrypted", str(marker))
        assert "plaintext" in line
    assert tree(wd.repo) == before


def test_copy_refuses_a_downgraded_target(tmp_path):
    source = Workdir(tmp_path / "home")
    source.init()
    make_image(tmp_path / "img", 2, seed=3)
    rec = source.create(tmp_path / "img")
    target = encrypted_by_env(tmp_path / "offsite")
    shutil.rmtree(target.cache)    # not known here: $LVBACKUP_TARGET_PASSPHRASE refuses it
    downgrade(target.repo)
    before = tree(target.repo)
    p = source.run("copy", rec["id"], "--to-config", target.config, env=TARGET_ENV)
    assert_one_line_error(p, 2, str(target.repo), "not encrypted",
                          "$LVBACKUP_TARGET_PASSPHRASE")
    assert tree(target.repo) == before

    # Known encrypted to this host (a copy went there): refused with no secret given, and
    # a repository that vanished is not made again unencrypted where one was encrypted.
    other = encrypted_by_env(tmp_path / "other")
    source.run_json("copy", rec["id"], "--to-config", other.config, env=TARGET_ENV)
    downgrade(other.repo)
    p = source.run("copy", rec["id"], "--to-config", other.config)
    assert_one_line_error(p, 2, "not encrypted", "used it encrypted")
    shutil.rmtree(other.repo)
    p = source.run("copy", rec["id"], "--to-config", other.config)
    assert_one_line_error(p, 2, "no repository", "--init")
    p = source.run("copy", rec["id"], "--to-config", other.config, "--init")
    assert_one_line_error(p, 2, "not encrypted", "used it encrypted")
    assert not (other.repo / "config").exists()


# --- 4. helpers see no secrets --------------------------------------------------------------

def test_hooks_see_no_secret(tmp_path):
    dumps = tmp_path / "env"
    dumps.mkdir()
    script = _hook_script(tmp_path, "dump-env", (
        "import json, os, sys\n"
        f"d = {str(dumps)!r}\n"
        "open(os.path.join(d, f'{len(os.listdir(d)):03d}.json'), 'w')"
        ".write(json.dumps(dict(os.environ)))\n"))
    wd = encrypted_by_env(tmp_path / "wd", hooks=[{"on": ["backup.*"], "command": [script]}])
    make_image(tmp_path / "img", 2, seed=7)
    p = wd.run("create", "--device", tmp_path / "img", env=SECRETS)
    assert p.returncode == 0, describe(p)
    seen = [json.loads(f.read_text()) for f in sorted(dumps.iterdir())]
    assert len(seen) >= 2
    for env in seen:
        assert env.get("PATH") == os.environ["PATH"] and "LVBACKUP_EVENT" in env
        assert not set(SECRETS) & set(env), sorted(set(SECRETS) & set(env))
        assert not set(SECRETS.values()) & set(env.values())


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_map_server_drops_the_secrets_once_the_repository_is_open(tmp_path, request,
                                                                      monkeypatch, where):
    """nbdkit runs for days: once it has opened the repository, no secret is left in its
    environment (/proc/PID/environ included), and it still serves the backup (the store's
    client kept the credentials it was made with: here, from the AWS_* environment)."""
    env = dict(SECRETS)
    if where == "s3":
        server = request.getfixturevalue("s3server")
        bucket = request.getfixturevalue("s3_bucket")
        section = {k: v for k, v in s3_section(server).items() if "_key" not in k}
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        del env["AWS_SESSION_TOKEN"]   # the test server would refuse it
        wd = Workdir(tmp_path / "wd", repository=f"s3://{bucket}/env-{uuid.uuid4().hex[:8]}",
                     s3=section)
        assert wd.run_json("init", "--block-size", "64K", "--encryption", env=env)["encrypted"]
    else:
        wd = encrypted_by_env(tmp_path / "wd")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    data = make_image(tmp_path / "disk.img", 2, seed=4)
    rec = wd.run_json("create", "--device", tmp_path / "disk.img", env=env)
    record = _start(wd, rec["id"])
    try:
        environ = Path(f"/proc/{record['pid']}/environ").read_bytes()
        assert b"PATH=" in environ
        for name, value in env.items():
            assert name.encode() not in environ and value.encode() not in environ, name
        client = NbdClient(str(Path(record["run_dir"]) / "socket"))
        try:
            assert client.pread(0, len(data)) == (0, data)
        finally:
            client.close()
    finally:
        os.kill(record["pid"], signal.SIGTERM)


# --- 6. permissions and passphrases ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["passphrase_file", "key_file"])
def test_a_secret_file_others_can_read_is_refused(tmp_path, kind):
    secret = tmp_path / "secret"
    wd = Workdir(tmp_path / "wd", **{kind: str(secret)})
    if kind == "passphrase_file":
        write_secret(secret, SECRET)
    assert wd.run_json("init", "--block-size", "64K", "--encryption")["encrypted"]
    assert wd.run("verify").returncode == 0
    for mode in (0o640, 0o604, 0o620):
        secret.chmod(mode)
        p = wd.run("verify")
        line = assert_one_line_error(p, 2, str(secret), f"chmod 600 {secret}")
        assert "other users" in line
    secret.chmod(0o400)
    assert wd.run("verify").returncode == 0


@pytest.mark.parametrize("sub", ["packs", "manifests", "index", "keys", "packs/*"])
def test_a_repository_subdirectory_others_can_write_is_refused(tmp_path, sub):
    wd = encrypted_by_env(tmp_path / "wd")
    make_image(tmp_path / "img", 2, seed=5)
    wd.run_json("create", "--device", tmp_path / "img", env=ENV)
    (path,) = sorted(wd.repo.glob(sub))[:1]
    path.chmod(0o777)
    p = wd.run("verify", env=ENV)
    assert_one_line_error(p, 2, "repository directory", str(path), "chmod go-w")
    path.chmod(0o700)
    assert wd.run("verify", env=ENV).returncode == 0


def _slots(wd: Workdir) -> dict[str, dict]:
    return {p.name: parse_slot(f"keys/{p.name}", p.read_bytes())
            for p in (wd.repo / "keys").iterdir()}


def test_a_short_passphrase_is_refused_for_a_new_slot(tmp_path):
    short = {"LVBACKUP_PASSPHRASE": "seven77"}
    fresh = Workdir(tmp_path / "fresh")
    p = fresh.run("init", "--block-size", "64K", "--encryption", env=short)
    assert_one_line_error(p, 2, "shorter than 8 characters", "$LVBACKUP_PASSPHRASE")
    assert not (fresh.repo / "config").exists()

    wd = encrypted_by_env(tmp_path / "wd")
    before = _slots(wd)
    write_secret(tmp_path / "short", "1234567")
    p = wd.run("key", "add", "--new-passphrase-file", tmp_path / "short", env=ENV)
    assert_one_line_error(p, 2, "shorter than 8 characters", str(tmp_path / "short"))
    p = wd.run("key", "change-passphrase", env={**ENV, "LVBACKUP_NEW_PASSPHRASE": "abc"})
    assert_one_line_error(p, 2, "shorter than 8 characters", "$LVBACKUP_NEW_PASSPHRASE")
    assert _slots(wd) == before
    # Eight characters are enough; a short passphrase that already opens a slot still does.
    p = wd.run("key", "add", env={**ENV, "LVBACKUP_NEW_PASSPHRASE": "8 chars!"})
    assert p.returncode == 0, describe(p)


def test_new_slots_use_scrypt_2_17_and_old_slots_keep_theirs_until_changed(tmp_path,
                                                                          monkeypatch):
    wd = encrypted_by_env(tmp_path / "wd")
    ((name, slot),) = _slots(wd).items()
    assert {k: slot["kdf"][k] for k in "nrp"} == {"n": 1 << 17, "r": 8, "p": 1}
    # A slot written by an older lvbackup (n = 2^15) in its place: it still opens.
    secret = Secret(PASSPHRASE, SECRET.encode(), "test")
    repo = Repository.open(wd.repo, tmp_path / "probe", lambda: [secret])
    assert repo.unlocked is not None
    monkeypatch.setitem(keys.SCRYPT, "n", 1 << 15)
    old_name, old = make_slot(repo.unlocked[0], secret, repo.id)
    repo.close()
    monkeypatch.undo()
    (wd.repo / "keys" / name).unlink()
    (wd.repo / old_name).write_bytes(old)
    make_image(tmp_path / "img", 1, seed=6)
    wd.run_json("create", "--device", tmp_path / "img", env=ENV)
    assert [s["kdf"]["n"] for s in _slots(wd).values()] == [1 << 15]
    # change-passphrase upgrades: the new slot has the new parameters, the old one is gone.
    new = "a new passphrase"
    p = wd.run("key", "change-passphrase", env={**ENV, "LVBACKUP_NEW_PASSPHRASE": new})
    assert p.returncode == 0, describe(p)
    assert [s["kdf"]["n"] for s in _slots(wd).values()] == [1 << 17]
    assert wd.run("verify", env={"LVBACKUP_PASSPHRASE": new}).returncode == 0


# --- 8. append-only on object storage -------------------------------------------------------

def test_config_check_warns_of_append_only_on_a_bucket_without_versioning(tmp_path,
                                                                          s3server):
    bucket = s3server.new_bucket()
    wd = Workdir(tmp_path / "wd", repository=f"s3://{bucket}/ao", s3=s3_section(s3server),
                 append_only=True)
    wd.init()
    p = wd.run("config", "check")
    assert p.returncode == 0, describe(p)
    (line,) = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert "append_only" in line and "versioning is off" in line and bucket in line
    plain = wd.run("config", "check", config=wd.config_with("no-ao.yaml"))
    assert plain.returncode == 0 and plain.stderr == "", describe(plain)
    s3server.client().put_bucket_versioning(
        Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    p = wd.run("config", "check")
    assert p.returncode == 0 and p.stderr == "", describe(p)
