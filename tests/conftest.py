"""Fixtures for the unit, CLI, fault-injection and crash tests (no LVM needed).

- `workdir`: a Workdir in tmp_path: `lvbackup.yaml` with `repository: <tmp>/repo` and
  `catalog: <tmp>/catalog.db` (the cache, hence locks and the index cache, is <tmp>/cache);
- `run(*args)` runs `<venv>/bin/lvbackup --config <that file> ARGS` and returns the
  CompletedProcess (text, captured); `run_json(*args)` adds --json, asserts exit 0 and
  returns the parsed document;
- `make_image(path, mib, seed)` and `change(path, seed)` build and modify images;
- `invoke(*args)` runs the click group in-process (click.testing.CliRunner) for fast tests;
- `s3server`: one real SeaweedFS server (tests/s3server.py) for the whole session, and
  `s3_bucket`: a bucket in it shared by the session (tests use their own prefixes).

Helpers live in tests/support.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import support  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _installed_command():
    if not support.LVBACKUP.exists():
        pytest.fail(f"{support.LVBACKUP} not found: install the project into the venv "
                    "(scripts/setup.sh)", pytrace=False)


@pytest.fixture(scope="session")
def s3server(tmp_path_factory: pytest.TempPathFactory):
    from s3server import SeaweedServer

    server = SeaweedServer(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3server) -> str:
    return s3server.new_bucket()


@pytest.fixture
def workdir(tmp_path: Path) -> support.Workdir:
    return support.Workdir(tmp_path)


@pytest.fixture
def run(workdir: support.Workdir):
    return workdir.run


@pytest.fixture
def run_json(workdir: support.Workdir):
    return workdir.run_json


@pytest.fixture
def make_image():
    return support.make_image


@pytest.fixture
def change():
    return support.apply_change


@pytest.fixture
def invoke(workdir: support.Workdir, monkeypatch):
    """In-process `lvbackup --config <workdir config> ARGS` through click's CliRunner."""
    from click.testing import CliRunner

    from lvbackup.cli import cli

    for key in ("LVBACKUP_CONFIG", "LVBACKUP_REPOSITORY", "LVBACKUP_CATALOG",
                "LVBACKUP_CACHE_DIR"):
        monkeypatch.delenv(key, raising=False)
    if support.ENCRYPTED:
        monkeypatch.setenv("LVBACKUP_PASSPHRASE", support.clean_env()["LVBACKUP_PASSPHRASE"])
    runner = CliRunner()

    def _invoke(*args, config: Path | None = None):
        return runner.invoke(cli, ["--config", str(config or workdir.config), *map(str, args)])

    return _invoke
