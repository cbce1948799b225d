"""The YAML configuration: defaults, validation with errors that name the key, env overrides.

The file is `--config`, else `$LVBACKUP_CONFIG`, else /etc/lvbackup/lvbackup.yaml (which may
be absent: then the defaults apply). Relative paths in a file are relative to that file.
`$LVBACKUP_REPOSITORY`, `$LVBACKUP_CATALOG` and `$LVBACKUP_CACHE_DIR` override the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError

DEFAULT_CONFIG_PATH = Path("/etc/lvbackup/lvbackup.yaml")
DEFAULT_STATE_DIR = Path("/var/lib/lvbackup")


class ConfigError(UsageError):
    pass


@dataclass(frozen=True)
class Config:
    repository: Path
    catalog: Path
    cache_dir: Path
    compression_level: int = 1
    workers: int = 2
    temp_snapshot_size: str = "20%ORIGIN"
    source: str = "defaults"

    @property
    def lock_dir(self) -> Path:
        return self.cache_dir / "locks"


def _path(value: Any, key: str, base: Path) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"config key '{key}' must be a path (a non-empty string)")
    return (base / os.path.expanduser(value)).resolve() if not os.path.isabs(value) else Path(value)


def _int(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"config key '{key}' must be a whole number from {low} to {high}")
    return value


_KEYS = ("repository", "catalog", "cache_dir", "compression_level", "workers",
         "temp_snapshot_size")
_SNAPSHOT_SIZE = re.compile(r"^([0-9]+(\.[0-9]+)?[bBsSkKmMgGtT]?|[0-9]{1,3}%(ORIGIN|VG|FREE))$")


def _snapshot_size(value: Any) -> str:
    text = str(value).strip()
    if not _SNAPSHOT_SIZE.match(text):
        raise ConfigError("config key 'temp_snapshot_size' must be an LVM size such as 2G, "
                          "or a share such as 20%ORIGIN")
    return text


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Read and validate the configuration; raise ConfigError naming the offending key."""
    explicit = path if path is not None else os.environ.get("LVBACKUP_CONFIG") or None
    cfg_path = Path(explicit) if explicit else DEFAULT_CONFIG_PATH
    raw: dict[str, Any] = {}
    if cfg_path.exists() or explicit:
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
    repository = _path(raw.get("repository", str(DEFAULT_STATE_DIR / "repository")), "repository", base)
    catalog = _path(raw.get("catalog", str(DEFAULT_STATE_DIR / "catalog.db")), "catalog", base)
    cache_dir = (_path(raw["cache_dir"], "cache_dir", base) if "cache_dir" in raw
                 else catalog.parent / "cache")
    return Config(
        repository=repository,
        catalog=catalog,
        cache_dir=cache_dir,
        compression_level=_int(raw.get("compression_level", 1), "compression_level", 1, 19),
        workers=_int(raw.get("workers", min(os.cpu_count() or 1, 8)), "workers", 1, 64),
        temp_snapshot_size=_snapshot_size(raw.get("temp_snapshot_size", "20%ORIGIN")),
        source=str(cfg_path) if raw or explicit else "defaults",
    )


def as_dict(config: Config) -> dict[str, Any]:
    """The effective configuration, for `config check` and --verbose."""
    return {f.name: (str(v) if isinstance(v := getattr(config, f.name), Path) else v)
            for f in fields(config)}
