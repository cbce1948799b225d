"""lvbackup config check (operations/maintenance.py)."""

from __future__ import annotations

import click

from ..operations.maintenance import config_warnings, effective_config
from . import App, group, pass_app


@group("config")
def config_group() -> None:
    """Configuration.

    \b
    Example:
      lvbackup --config ./lvbackup.yaml config check
    """


@config_group.command("check")
@pass_app
def config_check(app: App) -> None:
    """Validate the configuration file and print the effective configuration (every key,
    defaults included). An invalid file exits 2 naming the key; a hook command that is not
    found, or an event_log or metrics file in a directory that does not exist, is reported
    as a warning (nothing is created).

    \b
    Example:
      lvbackup --config ./lvbackup.yaml config check
    """
    import yaml

    config = app.config
    for warning in config_warnings(config):
        app.warn(warning)
    app.emit(effective_config(config),
             lambda d: click.echo(yaml.safe_dump(d, sort_keys=False, default_flow_style=False),
                                  nl=False))
