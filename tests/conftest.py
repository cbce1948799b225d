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

Slow tests: a test is marked `slow` (left out of the fast run, README.md) when
tests/durations.json records it taking more than SLOW_SECONDS. A run with
LVBACKUP_STORE_DURATIONS=1 writes the durations it measured into that file (the others
kept), as pytest-split stores its own: run it after adding or changing tests.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import support  # noqa: E402

DURATIONS = Path(__file__).with_name("durations.json")
SLOW_SECONDS = 1.0
_measured: dict[str, float] = {}


def _recorded() -> dict[str, float]:
    return json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    recorded = _recorded()
    for item in items:
        if recorded.get(item.nodeid, 0.0) > SLOW_SECONDS:
            item.add_marker(pytest.mark.slow)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _measured[report.nodeid] = _measured.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    if os.environ.get("LVBACKUP_STORE_DURATIONS") == "1" and _measured:
        durations = {**_recorded(), **{k: round(v, 3) for k, v in _measured.items()}}
        DURATIONS.write_text(json.dumps(dict(sorted(durations.items())), indent=0) + "\n")


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
