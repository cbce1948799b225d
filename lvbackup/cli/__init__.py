"""The command line: the root group, the global options, the per-invocation App, and the one
place an exception becomes a line on stderr and an exit status. Each command group is a module
of this package (create, restore, backups, ...), imported only when its command runs: a
command parses its options, calls one operation and renders the result."""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from .. import __version__
from ..base import faults
from ..base.errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, LvbackupError, UsageError
from ..datapath.pipeline import tune_malloc
from . import logsetup

if TYPE_CHECKING:
    from ..config import Config
    from ..session import Session

EXIT_CODES = """\b
Exit status:
  0   success
  1   the operation failed (I/O or network error, full disk, ...)
  2   invalid usage, or a request the current state forbids
  3   damage found in backed-up data (verify, restore, or any command that read it)
  75  the repository or volume is locked by another run (see --wait)
  130 interrupted (Ctrl-C): the work was stopped and cleaned up
  143 terminated (SIGTERM): the work was stopped and cleaned up
  'run' exits with the worst of its jobs' statuses (3 worst, then 2, 1, 75).
With --json a failure's line on stderr is a JSON object: {"error": ..., "exit_code": ...}.
Global options (--config, --json, --quiet, --verbose) go before or after the command.
"""

def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in "KMG" and t[-1:] else ""
    try:
        return int(t[: len(t) - len(unit)]) * units[unit]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 131072, 128K, 1M)") from None


class App:
    """Per-invocation state: global options, the configuration, the open session."""

    def __init__(self, config_path: str | None, as_json: bool, quiet: bool):
        self.config_path = config_path
        self.as_json = as_json
        self.quiet = quiet
        self._config: Config | None = None
        self._session: Session | None = None
        self.as_of: float | None = None     # --as-of: the repository as it stood then

    @property
    def config(self) -> Config:
        if self._config is None:
            from ..config import load_config
            self._config = load_config(self.config_path)
            if self.as_of is not None:
                from ..config import pinned
                self._config = pinned(self._config, self.as_of)
        return self._config

    def session(self, wait: float = 0.0) -> Session:
        if self._session is None:
            from ..session import Session
            self._session = Session(self.config, wait)
            self._session.warn = self.warn
            click.get_current_context().call_on_close(self._session.close)
        return self._session

    def warn(self, message: str) -> None:
        """One line on stderr (above a progress bar, if one is shown), even with --quiet:
        a failed hook or an unwritable metrics file is worth a cron mail."""
        from .render import err_console
        err_console().print(f"lvbackup: warning: {message}", markup=False, highlight=False,
                          soft_wrap=True)

    def emit(self, data: Any, human: Callable[[Any], None]) -> None:
        """The result: one JSON document with --json (explicit output wins over --quiet),
        nothing with --quiet (cron mails only failures), else `human(data)`."""
        if self.as_json:
            click.echo(json.dumps(data, indent=2))
        elif not self.quiet:
            human(data)

    def log(self, message: str) -> None:
        if not self.quiet:
            click.echo(message, err=True)

    @contextmanager
    def progress(self, label: str) -> Iterator[Callable[..., None] | None]:
        """A progress bar on stderr when it is a terminal and not --quiet (never on stdout):
        bytes done, throughput, ETA and, for a backup, new and stored bytes so far.
        The callback is `update(done, total, stats=None)`."""
        if self.quiet or not sys.stderr.isatty():
            yield None
            return
        from .progressbar import progress_bar
        from .render import err_console
        with progress_bar(label, err_console()) as update:
            yield update


def read_text_input(source: str) -> str:
    """The text of FILE or of standard input ("-"); undecodable text becomes a NUL, which
    every parser refuses."""
    try:
        if source == "-":
            return sys.stdin.read()
        with open(source) as f:
            return f.read(1 << 20)
    except OSError as e:
        raise UsageError(f"cannot read {source}: {e.strerror}") from None
    except UnicodeDecodeError:
        return "\x00"



# The global options, accepted before the command (the group's own options) and after it
# (lvbackup list --json): every command and group below the top carries them too, hidden
# from its --help, which says so in one line instead.
GLOBAL_NOTE = ("The global options --config, --json, --quiet and --verbose may also follow "
               "the command (see lvbackup --help).")


def _set_global(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """A global option given after the command: set on the App (a flag given in both
    places is simply on; two different --config files are refused)."""
    app = ctx.find_object(App)
    if app is None or value in (None, False):
        return
    if param.name == "config_path":
        if app.config_path not in (None, value):
            raise click.UsageError(f"--config given twice: {app.config_path} and {value}")
        app.config_path = value
    elif param.name == "verbose":   # the group's callback, which sets it up, ran already
        logsetup.verbose()
    else:
        setattr(app, str(param.name), True)


def _global_params() -> list[click.Parameter]:
    def hidden(decls: list[str], flag: bool) -> click.Option:
        return click.Option(decls, is_flag=flag, hidden=True, expose_value=False,
                            callback=_set_global)

    return [hidden(["--config", "config_path"], False), hidden(["--json", "as_json"], True),
            hidden(["--quiet", "-q", "quiet"], True),
            hidden(["--verbose", "-v", "verbose"], True)]


class Command(click.Command):
    """A command that also takes the global options after its name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.extend(_global_params())

    def invoke(self, ctx: click.Context) -> Any:
        app = ctx.find_object(App)
        if app is not None and app.as_of is not None:
            from ..operations import as_of
            as_of.check_command(ctx.command_path.split(" ", 1)[1], app.config)
        return super().invoke(ctx)

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        formatter.write_paragraph()
        formatter.write_text(GLOBAL_NOTE)


class Group(click.Group):
    """Reports an LvbackupError as exit_status() does, also when click runs the command
    in standalone mode (tests, shell completion). Its commands and subgroups take the
    global options after their name as well."""

    command_class = Command
    group_class = type   # subgroups are Groups too

    def __init__(self, *args: Any, top: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not top:
            self.params.extend(_global_params())

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        if ctx.parent is not None:
            formatter.write_paragraph()
            formatter.write_text(GLOBAL_NOTE)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LvbackupError as e:
            app = ctx.find_object(App)
            ctx.exit(exit_status(e, as_json=app is not None and app.as_json))


pass_app = click.make_pass_decorator(App)
wait_option = click.option("--wait", type=click.FloatRange(min=0), default=0.0,
                           show_default=True, metavar="SECONDS",
                           help="Wait this long for a lock held by another run, then exit 75.")


def command(name: str | None = None) -> Callable[[Callable[..., Any]], Command]:
    """A command of a group module (it takes the global options after its name too)."""
    return click.command(name, cls=Command)


def group(name: str | None = None) -> Callable[[Callable[..., Any]], Group]:
    """A subgroup of a group module (lvbackup key ..., lvbackup config ...)."""
    return click.group(name, cls=Group)


class Root(Group):
    """The top group: each command is imported from its module when it is looked up, so a
    run loads only what its command needs (--help still lists them all)."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            module, attr = self.lazy[cmd_name].split(":")
            # A Ctrl-C is held until the module has loaded: raised inside code an import
            # execs from a string (dataclasses, namedtuples), CPython would end the process
            # by the signal at exit, not with the status and the one line main() gives.
            held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                loaded = importlib.import_module(f"{__name__}.{module}")
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
            self.add_command(getattr(loaded, attr), cmd_name)
        return self.commands.get(cmd_name)


# Every command: its name, and "module:function" in this package (cli/<module>.py).
COMMANDS = {
    "init": "maintenance:init", "gc": "maintenance:gc", "catalog": "maintenance:catalog",
    "create": "create:create",
    "list": "backups:list_", "show": "backups:show", "delete": "backups:delete",
    "protect": "backups:protect", "unprotect": "backups:unprotect", "diff": "backups:diff",
    "export-record": "backups:export_record", "import-record": "backups:import_record",
    "restore": "restore:restore",
    "map": "nbd:map_", "unmap": "nbd:unmap", "mount": "nbd:mount_", "unmount": "nbd:unmount",
    "prune": "prune:prune",
    "run": "jobs:run_",
    "verify": "verify:verify",
    "copy": "copy:copy",
    "volumes": "volumes:volumes", "snapshot": "volumes:snapshot",
    "key": "key:key",
    "config": "config:config_group",
}


@click.group(cls=Root, top=True, lazy=COMMANDS, epilog=EXIT_CODES,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", metavar="FILE",
              help="Configuration file "
                   "[default: $LVBACKUP_CONFIG, else /etc/lvbackup/lvbackup.yaml]")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON document on stdout (docs/json.md); a failure is one JSON "
                   "line on stderr.")
@click.option("--quiet", "-q", is_flag=True,
              help="Print nothing on success (for cron); a failure still prints its line.")
@click.option("--verbose", "-v", is_flag=True, help="Explain more; tracebacks on internal errors.")
@click.option("--as-of", "as_of_time", metavar="TIME",
              help="Read the repository as it stood at TIME (ISO 8601 UTC; an S3 bucket with "
                   "versioning or Object Lock); only reading commands run.")
@click.version_option(__version__, prog_name="lvbackup")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, as_json: bool, quiet: bool,
        verbose: bool, as_of_time: str | None) -> None:
    """Back up LVM logical volumes, their snapshots, and any block device or image file:
    full and incremental, deduplicated, compressed and verifiable.

    \b
    Example:
      lvbackup init
      lvbackup create --device /srv/disk.img
      lvbackup create --device /srv/disk.img --incremental
      lvbackup list
    """
    ctx.obj = App(config_path, as_json, quiet)
    if verbose:
        logsetup.verbose()
    if as_of_time is not None:
        from ..operations import as_of
        try:
            ctx.obj.as_of = as_of.parse_as_of(as_of_time)
        except LvbackupError as e:
            ctx.exit(exit_status(e, as_json=as_json))


label_option = click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
                            help="Only backups with this label (repeatable: all must match).")


# --- entry point ---------------------------------------------------------------------------

class Terminated(SystemExit):
    """SIGTERM: unwinding through every finally, then exiting 128 + the signal number."""


def _on_signal(signum: int, _frame) -> None:
    # Unwind through every finally: temporary snapshots are removed, rows marked error.
    raise Terminated(128 + signum)


def exit_status(e: BaseException, verbose: bool = False, as_json: bool = False) -> int:
    """The one place where an exception becomes a line on stderr and an exit status: with
    --json, that line is a JSON object ({"error": message, "exit_code": status})."""
    code, kind, message = _failure(e, verbose)
    if message is not None:
        if as_json:
            click.echo(json.dumps({"error": message, "exit_code": code}), err=True)
        else:
            click.echo(f"lvbackup: {kind + ': ' if kind else ''}{message}", err=True)
    return code


def _failure(e: BaseException, verbose: bool) -> tuple[int, str, str | None]:
    """(exit status, kind of failure, message) of an exception; no message for an exit
    that says nothing."""
    if isinstance(e, click.ClickException):
        return (e.exit_code if e.exit_code else EXIT_USAGE), "error", e.format_message()
    if isinstance(e, (click.exceptions.Abort, KeyboardInterrupt)):
        return EXIT_INTERRUPTED, "", "interrupted"
    if isinstance(e, LvbackupError):
        return e.exit_code, "error", str(e)
    if isinstance(e, BrokenPipeError):
        return EXIT_FAILED, "", None
    if isinstance(e, Terminated):  # from _on_signal: the work was stopped and cleaned up
        code = e.code if isinstance(e.code, int) else EXIT_FAILED
        return code, "", f"terminated by signal {code - 128}"
    if isinstance(e, SystemExit):  # click's own exits (shell completion, --help, --version)
        return (e.code if isinstance(e.code, int) else
                (0 if e.code is None else EXIT_FAILED)), "", None
    if verbose:
        traceback.print_exception(e)
    return EXIT_FAILED, "internal error", (f"{type(e).__name__}: {e} "
                                           "(rerun with --verbose for details)")


def main() -> None:
    """Run the command line (through launcher.main, which handled Ctrl-C until now)."""
    args = sys.argv[1:]
    # How a failure is reported is read from the words themselves: it may come before click
    # has parsed them (a bad option), and the global options may follow the command.
    verbose = "-v" in args or "--verbose" in args
    as_json = "--json" in args
    try:
        # From here on a Ctrl-C unwinds through every finally, as SIGTERM does.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _on_signal)
        # What lvbackup creates is its owner's alone (docs/security.md), also files that
        # other code creates for it (SQLite's, gc's scratch database); metrics set their
        # own mode.
        os.umask(0o077)
        faults.check_requested()
        tune_malloc()
        result = cli.main(prog_name="lvbackup", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except BaseException as e:  # noqa: BLE001 - never a traceback unless asked for
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # one Ctrl-C: one line, then exit
        code = exit_status(e, verbose, as_json)
    # The command is done: a Ctrl-C now changes nothing (and must not end in a traceback).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(code)
