"""Packaging: boto3 is the `s3` extra, so lvbackup without it works on local repositories
and names the extra, in one line, when a repository is in object storage."""

from __future__ import annotations

from pathlib import Path

import support
from support import Workdir, assert_one_line_error, make_image


def without_boto3(tmp_path: Path) -> dict[str, str]:
    """The environment of a Python on which boto3 and botocore cannot be imported, as on a
    host that installed lvbackup without its s3 extra."""
    site = tmp_path / "no-boto3"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\nsys.modules['boto3'] = None\nsys.modules['botocore'] = None\n")
    return {"PYTHONPATH": str(site)}


def test_a_local_repository_needs_no_boto3(tmp_path: Path) -> None:
    env = without_boto3(tmp_path)
    w = Workdir(tmp_path / "w")
    image = tmp_path / "disk.img"
    make_image(image, 2, seed=1)
    p = w.run("--json", "init", "--block-size", "64K", env=env)
    assert p.returncode == 0, support.describe(p)
    p = w.run("--json", "create", "--device", image, env=env)
    assert p.returncode == 0, support.describe(p)
    assert w.run("list", env=env).returncode == 0


def test_an_s3_repository_without_boto3_names_the_extra(tmp_path: Path) -> None:
    env = without_boto3(tmp_path)
    w = Workdir(tmp_path / "w", repository="s3://bucket/prefix",
                s3={"endpoint_url": "http://127.0.0.1:9"})
    for args in (["init"], ["verify"], ["config", "check"]):
        p = w.run(*args, env=env)
        assert_one_line_error(p, 2, "boto3", "lvbackup[s3]")
