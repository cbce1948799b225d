"""The YAML configuration: defaults, validation with errors that name the key, env overrides.

The file is `--config`, else `$LVBACKUP_CONFIG`, else /etc/lvbackup/lvbackup.yaml (which may
be absent: then the defaults apply). Relative paths in a file are relative to that file.
`$LVBACKUP_REPOSITORY`, `$LVBACKUP_CATALOG` and `$LVBACKUP_CACHE_DIR` override the file.

`repository:` is a path, or a URL (`s3://BUCKET/PREFIX`, `file://PATH`) kept as a string;
the `s3:` section says how to reach an S3 store. Its credentials are never printed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from .base.errors import UsageError
from .base.labels import check_label
from .base.permissions import refuse_writable_by_others
from .catalog.retention import KINDS, Policy
from .events import DEFAULT_HOOK_TIMEOUT, Hook, matching_events

DEFAULT_CONFIG_PATH = Path("/etc/lvbackup/lvbackup.yaml")
DEFAULT_STATE_DIR = Path("/var/lib/lvbackup")
# change_sample: the least share (%) of the blocks a change list calls unchanged that is
# re-read to check it.
DEFAULT_SAMPLE_PERCENT = 0.1
# A classic snapshot's COW size when none is given (lvcreate --size, or a share of the origin).
DEFAULT_SNAPSHOT_SIZE = "20%ORIGIN"
DEFAULT_FREEZE_TIMEOUT = 10.0   # seconds (freeze_timeout:)



def default_workers() -> int:
    """Worker threads when `workers:` is not set: one per CPU, at most 8."""
    return min(os.cpu_count() or 1, 8)


class ConfigError(UsageError):
    pass


@dataclass(frozen=True)
class Job:
    """One entry of `jobs:` (`lvbackup run`): exactly one of volume, volumes, snapshot_of,
    device."""
    name: str
    volume: str | None = None        # VG/LV, read directly, or through a temporary snapshot
    volumes: tuple[str, ...] = ()    # VG/LVs: a consistency group named after the job
    snapshot_of: str | None = None   # VG/LV: back up its newest snapshot
    device: str | None = None        # a block device or image file
    force: bool = False
    incremental: bool = False
    full_every: int | None = None    # a full backup after this many backups (full included)
    full_every_days: int | None = None   # ... or when the last full is this many days old
    keep: Policy | None = None       # retention applied after a successful backup
    labels: dict[str, str] = field(default_factory=dict)
    keep_snapshot: bool | None = None   # None: the configuration's keep_snapshot
    copy_to: Path | None = None      # another configuration: the backup is copied there
    pre_snapshot: tuple[str, ...] | None = None    # argv; None: the configuration's
    post_snapshot: tuple[str, ...] | None = None

    @property
    def source(self) -> str:
        return self.volume or ",".join(self.volumes) or self.snapshot_of or self.device or ""


S3_ADDRESSING = ("auto", "path", "virtual")
OBJECT_LOCK_MODES = ("compliance", "governance")


@dataclass(frozen=True)
class ObjectLock:
    """`s3.object_lock`: every object holding a backup is written locked in `mode` until at
    least `days` days after it was written (or last extended)."""
    mode: str
    days: int

    @property
    def seconds(self) -> int:
        return self.days * 86400
DEFAULT_GC_GRACE = 6 * 3600


@dataclass(frozen=True)
class S3Settings:
    """The `s3:` section. Credentials missing here come from the environment or the AWS
    credential chain (boto3's); they are kept out of repr() and `config check`."""
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "auto"
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    object_lock: ObjectLock | None = None
    # Not a key of the file: `--as-of` (seconds since the epoch), which reads every object
    # as it stood then.
    as_of: float | None = None

    def public(self, source: str) -> dict[str, Any]:
        """What `config check` shows: everything but the secrets, and where they come from."""
        lock = self.object_lock
        return {"endpoint_url": self.endpoint_url, "region": self.region,
                "addressing_style": self.addressing_style, "credentials": source,
                "object_lock": None if lock is None else {"mode": lock.mode,
                                                          "days": lock.days}}


@dataclass(frozen=True)
class Config:
    repository: Path | str   # a path, or a URL such as s3://BUCKET/PREFIX
    catalog: Path
    cache_dir: Path
    compression_level: int = 1
    workers: int = field(default_factory=lambda: default_workers())
    temp_snapshot_size: str = DEFAULT_SNAPSHOT_SIZE
    keep_snapshot: bool = False      # keep a volume's snapshot as the next incremental's base
    change_tracking: bool = True     # use LVM's record of changes and of mapped blocks
    change_sample: float = DEFAULT_SAMPLE_PERCENT   # % of unchanged blocks re-read to check
    event_log: Path | None = None
    metrics: Path | None = None
    hooks: tuple[Hook, ...] = ()
    jobs: dict[str, Job] = field(default_factory=dict)
    # Quiesce commands (argv) run before a volume's snapshot is taken and after it (or,
    # for a group, around the freeze); a failing pre_snapshot aborts the backup.
    pre_snapshot: tuple[str, ...] | None = None
    post_snapshot: tuple[str, ...] | None = None
    freeze_timeout: float = DEFAULT_FREEZE_TIMEOUT   # seconds a group's filesystems stay frozen
    # An encrypted repository's secret (credentials.py): never a command-line argument.
    passphrase_file: Path | None = None
    passphrase_command: tuple[str, ...] | None = None   # argv, run without a shell
    key_file: Path | None = None
    append_only: bool = False   # delete, prune and gc refuse; nothing stored is removed
    s3: S3Settings = field(default_factory=S3Settings)
    # gc spares unreferenced packs and unfinished uploads younger than this in a store
    # shared with other hosts (object storage), whose backups may be about to use them.
    gc_grace_period: int = DEFAULT_GC_GRACE
    source: str = "defaults"

    @property
    def lock_dir(self) -> Path:
        return self.cache_dir / "locks"


def _path(value: Any, key: str, base: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"config key '{key}' must be a path (a non-empty string)")
    return (base / os.path.expanduser(value)).resolve() if not os.path.isabs(value) else Path(value)


def _optional_path(raw: dict, key: str, base: Path) -> Path | None:
    return _path(raw[key], key, base) if raw.get(key) is not None else None


def _location(value: Any, base: Path) -> Path | str:
    """A repository: a URL as it is (its backend checks it), else a path."""
    if isinstance(value, str) and _URL.match(value.strip()):
        return value.strip()
    return _path(value, "repository", base)


def _s3(value: Any) -> S3Settings:
    raw = _mapping(value if value is not None else {}, "s3")
    for k, v in raw.items():
        if k not in _S3_KEYS:
            raise ConfigError(f"config key 's3': unknown key '{k}' (expected "
                              f"{', '.join(_S3_KEYS)})")
        if k == "object_lock":
            continue
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise ConfigError(f"config key 's3.{k}' must be a non-empty string")
    style = raw.get("addressing_style") or "auto"
    if style not in S3_ADDRESSING:
        raise ConfigError(f"config key 's3.addressing_style' must be one of "
                          f"{', '.join(S3_ADDRESSING)}")
    if bool(raw.get("access_key_id")) != bool(raw.get("secret_access_key")):
        raise ConfigError("config keys 's3.access_key_id' and 's3.secret_access_key' go "
                          "together: give both or neither")
    return S3Settings(endpoint_url=raw.get("endpoint_url"), region=raw.get("region"),
                      addressing_style=style, access_key_id=raw.get("access_key_id"),
                      secret_access_key=raw.get("secret_access_key"),
                      object_lock=_object_lock(raw.get("object_lock")))


def _object_lock(value: Any) -> ObjectLock | None:
    if value is None:
        return None
    raw = _mapping(value, "s3.object_lock")
    for k in raw:
        if k not in ("mode", "days"):
            raise ConfigError(f"config key 's3.object_lock': unknown key '{k}' (expected "
                              "mode, days)")
    mode = raw.get("mode")
    if mode not in OBJECT_LOCK_MODES:
        raise ConfigError(f"config key 's3.object_lock.mode' must be one of "
                          f"{', '.join(OBJECT_LOCK_MODES)}")
    days = raw.get("days")
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 36500:
        raise ConfigError("config key 's3.object_lock.days' must be a positive whole number "
                          "of days (at most 36500)")
    return ObjectLock(mode=mode, days=days)


def _int(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"config key '{key}' must be a whole number from {low} to {high}")
    return value


_KEYS = ("repository", "catalog", "cache_dir", "compression_level", "workers",
         "temp_snapshot_size", "keep_snapshot", "change_tracking", "change_sample",
         "event_log", "metrics", "hooks", "jobs", "passphrase_file", "passphrase_command",
         "key_file", "append_only", "s3", "gc_grace_period", "pre_snapshot", "post_snapshot",
         "freeze_timeout")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_S3_KEYS = ("endpoint_url", "region", "addressing_style", "access_key_id", "secret_access_key",
            "object_lock")
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_JOB_KEYS = ("volume", "volumes", "snapshot_of", "device", "force", "incremental",
             "full_every", "keep", "labels", "keep_snapshot", "copy_to", "pre_snapshot",
             "post_snapshot")
_HOOK_KEYS = ("on", "command", "timeout")
# The label every backup made by `lvbackup run` carries: the name of its job.
JOB_LABEL = "job"


def _mapping(value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{key}' must be a mapping of keys to values")
    for k in value:
        if not isinstance(k, str):
            raise ConfigError(f"config key '{key}' has a key that is not a string: {k!r}")
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be true or false")
    return value


def _strings(value: Any, key: str, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, str) and v for v in value)):
        raise ConfigError(f"config key '{key}' must be a non-empty list of {what}")
    return tuple(value)


def _hooks(value: Any) -> tuple[Hook, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError("config key 'hooks' must be a list of {on, command, timeout} mappings")
    hooks = []
    for n, item in enumerate(value):
        key = f"hooks[{n}]"
        if isinstance(item, dict) and True in item and "on" not in item:
            # YAML 1.1 (PyYAML) reads an unquoted key `on` as the boolean true.
            item = {("on" if k is True else k): v for k, v in item.items()}
        item = _mapping(item, key)
        for k in item:
            if k not in _HOOK_KEYS:
                raise ConfigError(f"config key '{key}': unknown key '{k}' "
                                  f"(expected {', '.join(_HOOK_KEYS)})")
        if "on" not in item or "command" not in item:
            raise ConfigError(f"config key '{key}' needs 'on' (events) and 'command' (argv)")
        on = _strings(item["on"], f"{key}.on", "event names")
        for pattern in on:
            if not matching_events(pattern):
                raise ConfigError(f"config key '{key}.on': {pattern!r} names no event "
                                  "(e.g. backup.create.end, backup.create.error, backup.*)")
        command = _strings(item["command"], f"{key}.command", "arguments (argv, no shell)")
        timeout = item.get("timeout", DEFAULT_HOOK_TIMEOUT)
        if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                or not 0 < timeout <= 3600):
            raise ConfigError(f"config key '{key}.timeout' must be a number of seconds "
                              "from 0 to 3600")
        hooks.append(Hook(on=on, command=command, timeout=float(timeout)))
    return tuple(hooks)


_FULL_EVERY = re.compile(r"^\s*([0-9]+)\s*(d|days?)\s*$")


def _job(name: Any, raw: Any, base: Path) -> Job:
    if not isinstance(name, str) or not _JOB_NAME.match(name):
        raise ConfigError(f"config key 'jobs': invalid job name {name!r}: use letters, digits "
                          "and _ . - (starting with a letter or digit)")
    key = f"jobs.{name}"
    raw = _mapping(raw if raw is not None else {}, key)
    for k in raw:
        if k not in _JOB_KEYS:
            raise ConfigError(f"config key '{key}': unknown key '{k}'")
    given = [k for k in ("volume", "volumes", "snapshot_of", "device") if raw.get(k) is not None]
    if len(given) != 1:
        raise ConfigError(f"config key '{key}' needs exactly one source: volume: VG/LV, "
                          "volumes: [VG/LV, ...], snapshot_of: VG/LV or device: PATH")
    src = given[0]
    spec = raw[src]
    if src == "volumes":
        spec = tuple(_volume_name(v, f"{key}.volumes")
                     for v in _strings(spec, f"{key}.volumes", "volume names VG/LV"))
        if len(set(spec)) != len(spec):
            raise ConfigError(f"config key '{key}.volumes' names a volume twice")
    elif not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"config key '{key}.{src}' must be a non-empty string")
    elif src == "device":
        spec = str(_path(spec, f"{key}.device", base))
    else:
        spec = _volume_name(spec, f"{key}.{src}")
    force = _bool(raw.get("force", False), f"{key}.force")
    if force and src not in ("volume", "volumes"):
        raise ConfigError(f"config key '{key}.force' applies only to a 'volume:' source")
    keep_snapshot = None
    if raw.get("keep_snapshot") is not None:
        keep_snapshot = _bool(raw["keep_snapshot"], f"{key}.keep_snapshot")
        if keep_snapshot and src not in ("volume", "volumes"):
            raise ConfigError(f"config key '{key}.keep_snapshot' applies only to a 'volume:' "
                              "source")
    incremental = _bool(raw.get("incremental", False), f"{key}.incremental")
    every = every_days = None
    if raw.get("full_every") is not None:
        if not incremental:
            raise ConfigError(f"config key '{key}.full_every' needs 'incremental: true'")
        value = raw["full_every"]
        m = _FULL_EVERY.match(value) if isinstance(value, str) else None
        if m:
            every_days = _int(int(m.group(1)), f"{key}.full_every", 1, 36500)
        elif isinstance(value, int) and not isinstance(value, bool):
            every = _int(value, f"{key}.full_every", 1, 100000)
        else:
            raise ConfigError(f"config key '{key}.full_every' must be a number of backups "
                              "(e.g. 7) or of days (e.g. 7d)")
    keep = None
    if raw.get("keep") is not None:
        keep_raw = _mapping(raw["keep"], f"{key}.keep")
        for k in keep_raw:
            if k not in KINDS:
                raise ConfigError(f"config key '{key}.keep': unknown key '{k}' "
                                  f"(expected {', '.join(KINDS)})")
        keep = Policy(**{k: _int(v, f"{key}.keep.{k}", 0, 100000) for k, v in keep_raw.items()})
        if keep.empty:
            raise ConfigError(f"config key '{key}.keep' keeps nothing: give at least one "
                              f"of {', '.join(KINDS)} greater than 0")
    labels = {}
    for k, v in _mapping(raw.get("labels") or {}, f"{key}.labels").items():
        try:
            k, v = check_label(k, v, f"config key '{key}.labels'")
        except UsageError as e:
            raise ConfigError(str(e)) from None
        if k == JOB_LABEL:
            raise ConfigError(f"config key '{key}.labels': the label '{JOB_LABEL}' is set by "
                              "lvbackup run (to the job's name)")
        labels[k] = v
    copy_to = (_path(raw["copy_to"], f"{key}.copy_to", base)
               if raw.get("copy_to") is not None else None)
    return Job(name=name, **{src: spec}, force=force, incremental=incremental,
               full_every=every, full_every_days=every_days, keep=keep, labels=labels,
               keep_snapshot=keep_snapshot, copy_to=copy_to,
               pre_snapshot=_argv(raw, "pre_snapshot", f"{key}."),
               post_snapshot=_argv(raw, "post_snapshot", f"{key}."))


def _volume_name(spec: Any, key: str) -> str:
    vg_lv = spec.removeprefix("/dev/").split("/") if isinstance(spec, str) else []
    if len(vg_lv) != 2 or not all(vg_lv):
        raise ConfigError(f"config key '{key}' must be a volume name VG/LV")
    return "/".join(vg_lv)


def _argv(raw: dict, name: str, prefix: str = "") -> tuple[str, ...] | None:
    if raw.get(name) is None:
        return None
    return _strings(raw[name], prefix + name, "arguments (argv, no shell)")


def _freeze_timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 600:
        raise ConfigError("config key 'freeze_timeout' must be a number of seconds from 0 "
                          "to 600")
    return float(value)


def _jobs(value: Any, base: Path) -> dict[str, Job]:
    if value is None:
        return {}
    return {name: _job(name, raw, base) for name, raw in _mapping(value, "jobs").items()}
_SNAPSHOT_SIZE = re.compile(r"^([0-9]+(\.[0-9]+)?[bBsSkKmMgGtT]?|[0-9]{1,3}%(ORIGIN|VG|FREE))$")


def _snapshot_size(value: Any) -> str:
    text = str(value).strip()
    if not _SNAPSHOT_SIZE.match(text):
        raise ConfigError("config key 'temp_snapshot_size' must be an LVM size such as 2G, "
                          f"or a share such as {DEFAULT_SNAPSHOT_SIZE}")
    return text


def _sample(value: Any) -> float:
    low = DEFAULT_SAMPLE_PERCENT
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= 100:
        raise ConfigError(f"config key 'change_sample' must be a percentage from {low} to 100")
    return float(value)


def pinned(config: Config, when: float) -> Config:
    """The configuration that reads the repository as it stood at `when` (--as-of)."""
    return replace(config, s3=replace(config.s3, as_of=when))


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Read and validate the configuration; raise ConfigError naming the offending key."""
    explicit = path if path is not None else os.environ.get("LVBACKUP_CONFIG") or None
    cfg_path = Path(explicit) if explicit else DEFAULT_CONFIG_PATH
    raw: dict[str, Any] = {}
    if cfg_path.exists() or explicit:
        refuse_writable_by_others(cfg_path.parent, "configuration directory")
        refuse_writable_by_others(cfg_path, "configuration file")
        try:
            text = cfg_path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file {cfg_path} not found") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {cfg_path}: {e.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            raise ConfigError(f"config file {cfg_path} is not valid YAML{line}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {cfg_path} must be a mapping of keys to values")
        raw = loaded
    for key in raw:
        if key not in _KEYS:
            raise ConfigError(f"config file {cfg_path}: unknown key '{key}'")
    base = cfg_path.parent.resolve()
    for key, env in (("repository", "LVBACKUP_REPOSITORY"), ("catalog", "LVBACKUP_CATALOG"),
                     ("cache_dir", "LVBACKUP_CACHE_DIR")):
        if os.environ.get(env):
            raw[key] = os.environ[env]
    repository = _location(raw.get("repository", str(DEFAULT_STATE_DIR / "repository")), base)
    catalog = _path(raw.get("catalog", str(DEFAULT_STATE_DIR / "catalog.db")), "catalog", base)
    cache_dir = (_path(raw["cache_dir"], "cache_dir", base) if "cache_dir" in raw
                 else catalog.parent / "cache")
    append_only = _bool(raw.get("append_only", False), "append_only")
    s3 = _s3(raw.get("s3"))
    if s3.object_lock is not None and not str(repository).lower().startswith("s3://"):
        raise ConfigError("config key 's3.object_lock' needs a repository in S3 "
                          f"(s3://BUCKET/PREFIX); {repository} is not")
    jobs = _jobs(raw.get("jobs"), base)
    if append_only and any(job.keep for job in jobs.values()):
        raise ConfigError("config key 'append_only': no job may have 'keep:' (retention "
                          "deletes backups); prune from a host allowed to delete")
    return Config(
        repository=repository,
        catalog=catalog,
        cache_dir=cache_dir,
        compression_level=_int(raw.get("compression_level", 1), "compression_level", 1, 19),
        workers=_int(raw.get("workers", default_workers()), "workers", 1, 64),
        temp_snapshot_size=_snapshot_size(raw.get("temp_snapshot_size",
                                                  DEFAULT_SNAPSHOT_SIZE)),
        keep_snapshot=_bool(raw.get("keep_snapshot", False), "keep_snapshot"),
        change_tracking=_bool(raw.get("change_tracking", True), "change_tracking"),
        change_sample=_sample(raw.get("change_sample", DEFAULT_SAMPLE_PERCENT)),
        event_log=(_path(raw["event_log"], "event_log", base)
                   if raw.get("event_log") is not None else None),
        metrics=_path(raw["metrics"], "metrics", base) if raw.get("metrics") is not None else None,
        hooks=_hooks(raw.get("hooks")),
        jobs=jobs,
        passphrase_file=_optional_path(raw, "passphrase_file", base),
        passphrase_command=(_strings(raw["passphrase_command"], "passphrase_command",
                                     "arguments (argv, no shell)")
                            if raw.get("passphrase_command") is not None else None),
        key_file=_optional_path(raw, "key_file", base),
        append_only=append_only,
        s3=s3,
        pre_snapshot=_argv(raw, "pre_snapshot"),
        post_snapshot=_argv(raw, "post_snapshot"),
        freeze_timeout=_freeze_timeout(raw.get("freeze_timeout", DEFAULT_FREEZE_TIMEOUT)),
        gc_grace_period=_int(raw.get("gc_grace_period", DEFAULT_GC_GRACE), "gc_grace_period",
                             0, 10 * 365 * 86400),
        source=str(cfg_path) if raw or explicit else "defaults",
    )


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def as_dict(config: Config, credentials: str) -> dict[str, Any]:
    """The effective configuration, for `config check` and --verbose (plain JSON types),
    with `credentials` saying where the S3 credentials come from (never what they are)."""
    out = {f.name: _plain(getattr(config, f.name)) for f in fields(config)}
    out["s3"] = config.s3.public(credentials)
    for job in out["jobs"].values():
        job.pop("name", None)
        days = job.pop("full_every_days")
        if days is not None:
            job["full_every"] = f"{days}d"
        for src in ("volume", "snapshot_of", "device"):
            if job[src] is None:
                job.pop(src)
        if not job["volumes"]:
            job.pop("volumes")
    return out
