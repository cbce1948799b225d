"""`lvbackup run`: the config's jobs (device sources here; LVM sources in
tests/lvm/test_jobs_lvm.py), full/incremental cadence, retention after success, labels,
the summary, the exit status, and the Prometheus textfile."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from lvbackup import metrics
from lvbackup.config import Job
from lvbackup.operations.jobs import full_or_incremental, worst_exit

from support import Workdir, apply_change, assert_one_line_error, describe, flip_byte, make_image

# --- pure helpers --------------------------------------------------------------------------

def test_worst_exit_ranks_locked_below_failed_below_usage_below_damage():
    assert worst_exit([]) == 0
    assert worst_exit([0, 0]) == 0
    assert worst_exit([0, 75]) == 75
    assert worst_exit([75, 1, 0]) == 1
    assert worst_exit([1, 2, 75]) == 2
    assert worst_exit([2, 3, 1, 75]) == 3


def _b(days_ago: float, incremental: bool, status: str = "available") -> dict:
    ts = (datetime(2026, 6, 30, tzinfo=UTC) - timedelta(days=days_ago)).isoformat()
    return {"status": status, "is_incremental": incremental, "data_timestamp": ts,
            "created_at": ts}


NOW = datetime(2026, 6, 30, tzinfo=UTC)


def test_full_or_incremental_by_count():
    job = Job(name="j", device="/x", incremental=True, full_every=3)
    assert full_or_incremental(job, [], NOW)[0] is False
    assert full_or_incremental(job, [_b(3, False)], NOW)[0] is True
    assert full_or_incremental(job, [_b(3, False), _b(2, True)], NOW)[0] is True
    incremental, why = full_or_incremental(job, [_b(3, False), _b(2, True), _b(1, True)], NOW)
    assert incremental is False and "3 backups" in why
    # A newer full restarts the count; failed backups do not count.
    assert full_or_incremental(job, [_b(3, False), _b(2, True), _b(1, True), _b(0.5, False),
                                     _b(0.2, True, "error")], NOW)[0] is True


def test_full_or_incremental_by_age():
    job = Job(name="j", device="/x", incremental=True, full_every_days=7)
    assert full_or_incremental(job, [_b(6.9, False), _b(1, True)], NOW)[0] is True
    incremental, why = full_or_incremental(job, [_b(7, False), _b(1, True)], NOW)
    assert incremental is False and "7 days" in why
    # Only incrementals left (their full was deleted): a full is due.
    assert full_or_incremental(job, [_b(2, True)], NOW)[0] is False


def test_not_incremental_is_always_full():
    job = Job(name="j", device="/x")
    assert full_or_incremental(job, [_b(1, False)], NOW)[0] is False


# --- lvbackup run -------------------------------------------------------------------------

def _jobs_workdir(tmp_path: Path, jobs: dict, **extra) -> Workdir:
    wd = Workdir(tmp_path / "wd", jobs=jobs, **extra)
    wd.init("64K")
    return wd


@pytest.mark.slow
def test_run_makes_fulls_and_incrementals_and_prunes_after_success(tmp_path):
    img = tmp_path / "disk.img"
    make_image(img, 4, seed=81)
    wd = _jobs_workdir(tmp_path, {"nightly": {
        "device": str(img), "incremental": True, "full_every": 2,
        "keep": {"last": 3}, "labels": {"tier": "gold"}}})
    manual = wd.create(img, "--name", "by hand")
    versions, kinds, ids = [], [], []
    for seed in range(4):
        versions.append(apply_change(img, seed=seed + 90, fraction=0.03))
        summary = wd.run_json("run")
        assert summary["ok"] is True and summary["exit_code"] == 0
        (job,) = summary["jobs"]
        assert job["job"] == "nightly" and job["status"] == "ok" and job["error"] is None
        kinds.append(job["kind"])
        ids.append(job["backup"]["id"])
        assert job["backup"]["labels"] == {"tier": "gold", "job": "nightly"}
        assert job["backup"]["name"] == "nightly"
    # The manual full counts as the volume's last full: incr, then full after 2 backups...
    assert kinds == ["incremental", "full", "incremental", "full"]
    # keep last 3 among the job's own backups: the first one went; the manual one stays.
    listed = {r["id"]: r for r in wd.list()}
    assert set(listed) == {manual["id"], *ids[1:]}
    assert wd.list("--label", "job=nightly") == [listed[i] for i in ids[1:]]
    for bid, data in zip(ids[1:], versions[1:], strict=True):
        wd.assert_restores(bid, data)


def test_one_failing_job_does_not_stop_the_others(tmp_path):
    good = tmp_path / "good.img"
    data = make_image(good, 2, seed=82)
    wd = _jobs_workdir(tmp_path, {
        "missing": {"device": str(tmp_path / "nope.img")},
        "good": {"device": str(good)}})
    p = wd.run("--json", "run")
    assert p.returncode == 2, describe(p)
    summary = json.loads(p.stdout)
    assert summary["ok"] is False and summary["exit_code"] == 2
    by_job = {j["job"]: j for j in summary["jobs"]}
    assert [j["job"] for j in summary["jobs"]] == ["missing", "good"]
    assert by_job["missing"]["status"] == "failed" and by_job["missing"]["exit_code"] == 2
    assert "does not exist" in by_job["missing"]["error"]
    assert by_job["good"]["status"] == "ok"
    wd.assert_restores(by_job["good"]["backup"]["id"], data)
    # stderr: the job's failure, then one summary line (JSON, with --json); no traceback.
    assert "Traceback" not in p.stderr
    last = json.loads(p.stderr.strip().splitlines()[-1])
    assert last["exit_code"] == 2 and last["error"].startswith("1 of 2 jobs failed: missing (")


def test_exit_status_is_the_worst_of_the_jobs(tmp_path):
    img = tmp_path / "disk.img"
    make_image(img, 2, seed=83)
    wd = _jobs_workdir(tmp_path, {"corrupt": {"device": str(img), "incremental": True}})
    parent = wd.create(img)
    flip_byte(wd.repo / "manifests" / parent["id"], 20)
    p = wd.run("--json", "run")
    assert p.returncode == 3, describe(p)   # damage found in what is backed up
    (job,) = json.loads(p.stdout)["jobs"]
    assert job["exit_code"] == 3 and job["backup"] is None
    p = wd.run("--json", "run", "corrupt", config=wd.config_with(
        "two.yaml", jobs={"corrupt": {"device": str(img), "incremental": True},
                          "absent": {"device": str(tmp_path / "absent.img")}}))
    assert p.returncode == 3, describe(p)   # only the named job ran
    assert [j["job"] for j in json.loads(p.stdout)["jobs"]] == ["corrupt"]
    p = wd.run("--json", "run", config=wd.config_with(
        "two.yaml", jobs={"corrupt": {"device": str(img), "incremental": True},
                          "absent": {"device": str(tmp_path / "absent.img")}}))
    assert p.returncode == 3, describe(p)   # damage (3) is worse than a usage error (2)


def test_run_of_unknown_job_or_without_jobs_is_a_usage_error(tmp_path):
    img = tmp_path / "disk.img"
    make_image(img, 1, seed=84)
    wd = _jobs_workdir(tmp_path, {"a": {"device": str(img)}})
    assert_one_line_error(wd.run("run", "b"), 2, "no job named b")
    assert wd.list() == []
    bare = Workdir(tmp_path / "bare")
    assert_one_line_error(bare.run("run"), 2, "no jobs")


def test_human_summary_and_quiet(tmp_path):
    img = tmp_path / "disk.img"
    make_image(img, 1, seed=85)
    wd = _jobs_workdir(tmp_path, {"imgjob": {"device": str(img)}})
    p = wd.run("run")
    assert p.returncode == 0, describe(p)
    assert "imgjob" in p.stdout and "ok" in p.stdout and "full" in p.stdout
    assert "job imgjob: backing up" in p.stderr
    p = wd.run("--quiet", "run")
    assert p.returncode == 0 and p.stderr == "", describe(p)


def test_metrics_textfile_per_volume(tmp_path):
    prom = tmp_path / "textfile" / "lvbackup.prom"
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    make_image(a, 2, seed=86)
    make_image(b, 3, seed=87)
    wd = _jobs_workdir(tmp_path, {"a": {"device": str(a)}, "b": {"device": str(b),
                                                                 "incremental": True}},
                       metrics=str(prom))
    summary = wd.run_json("run")
    samples = _samples(prom)
    for img, size in ((a, 2 << 20), (b, 3 << 20)):
        v = str(img.resolve())
        assert samples[("lvbackup_last_status", v)] == 1
        assert samples[("lvbackup_last_read_bytes", v)] == size
        assert samples[("lvbackup_last_stored_bytes", v)] > 0
        assert samples[("lvbackup_last_duration_seconds", v)] >= 0
        assert samples[("lvbackup_last_success_timestamp_seconds", v)] == \
            samples[("lvbackup_last_run_timestamp_seconds", v)]
    first_success = samples[("lvbackup_last_success_timestamp_seconds", str(b.resolve()))]
    # Job b fails next time (its parent is corrupt); a's series are kept.
    bid = [j for j in summary["jobs"] if j["job"] == "b"][0]["backup"]["id"]
    flip_byte(wd.repo / "manifests" / bid, 20)
    assert wd.run("run", "b").returncode == 3
    samples = _samples(prom)
    assert samples[("lvbackup_last_status", str(b.resolve()))] == 0
    assert samples[("lvbackup_last_success_timestamp_seconds", str(b.resolve()))] == first_success
    assert samples[("lvbackup_last_status", str(a.resolve()))] == 1
    text = prom.read_text()
    assert "# TYPE lvbackup_last_status gauge" in text
    assert not [p for p in prom.parent.iterdir() if p.name != "lvbackup.prom"]  # no temp left


def test_metrics_from_create_too(tmp_path):
    prom = tmp_path / "lvbackup.prom"
    wd = Workdir(tmp_path / "wd", metrics=str(prom))
    wd.init("64K")
    img = tmp_path / "disk.img"
    make_image(img, 1, seed=88)
    assert wd.run("create", "--device", img, "--incremental").returncode == 2
    assert _samples(prom)[("lvbackup_last_status", str(img.resolve()))] == 0
    wd.create(img)
    assert _samples(prom)[("lvbackup_last_status", str(img.resolve()))] == 1


def test_metric_names_follow_prometheus_conventions():
    """Base units named by the suffix; `_total` only on counters."""
    for name, (kind, help_text) in metrics.METRICS.items():
        assert kind in ("gauge", "counter"), name
        assert name.endswith("_total") == (kind == "counter"), name
        if "bytes" in name.split("_") or "Bytes" in help_text:
            assert name.endswith("_bytes"), name
        if "timestamp" in name or "duration" in name:
            assert name.endswith("_seconds"), name


def test_series_under_a_renamed_metric_leave_the_file(tmp_path):
    prom, locks = tmp_path / "lvbackup.prom", tmp_path / "locks"
    prom.write_text('lvbackup_last_bytes_read{volume="vg0/data"} 5\n'
                    'lvbackup_last_status{volume="vg0/other"} 1\n')
    metrics.record_backup(prom, locks, "vg0/data", ok=True, ended_at=1.0, duration=2.0,
                          bytes_read=7, bytes_stored=3)
    samples = _samples(prom)
    assert samples[("lvbackup_last_read_bytes", "vg0/data")] == 7
    assert samples[("lvbackup_last_status", "vg0/other")] == 1
    assert not [k for k in samples if k[0] == "lvbackup_last_bytes_read"]


_LINE = re.compile(r'^(\w+)\{volume="([^"]*)"\} (\S+)$')


def _samples(path: Path) -> dict[tuple[str, str], float]:
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            continue
        m = _LINE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        out[(m.group(1), m.group(2))] = float(m.group(3))
    return out


@pytest.mark.parametrize("job, key", [
    ({"device": "/x", "volume": "vg/lv"}, "jobs.j"),
    ({}, "jobs.j"),
    ({"device": "/x", "bogus": 1}, "jobs.j"),
    ({"device": "/x", "full_every": 3}, "jobs.j.full_every"),
    ({"device": "/x", "incremental": True, "full_every": "weekly"}, "jobs.j.full_every"),
    ({"device": "/x", "keep": {"daily": -1}}, "jobs.j.keep.daily"),
    ({"device": "/x", "keep": {"fortnightly": 1}}, "jobs.j.keep"),
    ({"device": "/x", "keep": {"last": 0}}, "jobs.j.keep"),
    ({"device": "/x", "labels": {"job": "x"}}, "jobs.j.labels"),
    ({"device": "/x", "labels": {"bad key": "x"}}, "jobs.j.labels"),
    ({"device": "/x", "force": "yes"}, "jobs.j.force"),
    ({"device": "/x", "force": True}, "jobs.j.force"),
    ({"volume": "not-a-volume-name"}, "jobs.j.volume"),
])
def test_bad_jobs_are_config_errors_naming_the_key(tmp_path, job, key):
    wd = Workdir(tmp_path / "wd", jobs={"j": job})
    line = assert_one_line_error(wd.run("config", "check"), 2)
    assert f"'{key}" in line, line
