"""lvbackup key ...: an encrypted repository's key slots (operations/key.py)."""

from __future__ import annotations

from pathlib import Path

import click

from ..base.errors import UsageError
from ..operations.key import add_key, change_passphrase, export_key, import_key, list_keys
from . import App, group, pass_app, read_text_input
from .render import count


@group()
def key() -> None:
    """An encrypted repository's keys: export them (keep that copy safe), import, add a
    passphrase or key file, change a passphrase. Secrets never come from arguments.

    \b
    Example:
      lvbackup key export --to /root/lvbackup-key.txt
      LVBACKUP_NEW_PASSPHRASE=... lvbackup key change-passphrase
    """


@key.command("list")
@pass_app
def key_list(app: App) -> None:
    """List the key slots (each a passphrase or key file that opens the repository).

    \b
    Example:
      lvbackup key list
    """
    def human(rows: list[dict]) -> None:
        for r in rows:
            click.echo(f"{r['slot']}  {r['kind']}{'  (used now)' if r['used'] else ''}")

    app.emit(list_keys(app.session()), human)


@key.command("export")
@click.option("--to", "to", type=click.Path(dir_okay=False), metavar="FILE",
              help="Write it to this new file (0600) instead of standard output.")
@pass_app
def key_export(app: App, to: str | None) -> None:
    """Print the key slots as text: with a passphrase (or key file), it opens the backups
    even if the repository's own slots are lost. Keep it apart from the repository.

    \b
    Example:
      lvbackup key export --to /root/lvbackup-key.txt
    """
    text = export_key(app.session(), Path(to) if to else None)
    if to is None:
        click.echo(text, nl=False)   # JSON already
    else:
        app.emit({"exported_to": to}, lambda r: click.echo(f"Key exported to {to}"))


@key.command("import")
@click.argument("source", metavar="FILE|-")
@pass_app
def key_import(app: App, source: str) -> None:
    """Put the key slots of a key export back into the repository.

    \b
    Example:
      LVBACKUP_PASSPHRASE=... lvbackup key import /root/lvbackup-key.txt
    """
    text = read_text_input(source)
    app.emit(import_key(app.session(), text),
             lambda r: click.echo(f"Imported {count(len(r['slots_added']), 'key slot')}"))


new_passphrase_option = click.option(
    "--new-passphrase-file", type=click.Path(dir_okay=False), metavar="FILE",
    help="Read the new passphrase from this file [default: $LVBACKUP_NEW_PASSPHRASE].")


@key.command("add")
@new_passphrase_option
@click.option("--key-file", type=click.Path(dir_okay=False), metavar="FILE",
              help="Create a new key file here (0600) and add it, instead of a passphrase.")
@pass_app
def key_add(app: App, new_passphrase_file: str | None, key_file: str | None) -> None:
    """Add another passphrase or key file that opens the repository.

    \b
    Example:
      LVBACKUP_NEW_PASSPHRASE=... lvbackup key add
      lvbackup key add --key-file /root/lvbackup.key
    """
    if new_passphrase_file and key_file:
        raise UsageError("give --new-passphrase-file or --key-file, not both")
    result = add_key(app.session(), Path(new_passphrase_file) if new_passphrase_file else None,
                     Path(key_file) if key_file else None)
    app.emit(result, lambda r: click.echo(f"Added {r['kind'].replace('_', ' ')} slot "
                                          f"{r['slot']}"))


@key.command("change-passphrase")
@new_passphrase_option
@pass_app
def key_change_passphrase(app: App, new_passphrase_file: str | None) -> None:
    """Replace the current passphrase (no data is rewritten).

    \b
    Example:
      LVBACKUP_PASSPHRASE=old LVBACKUP_NEW_PASSPHRASE=new lvbackup key change-passphrase
    """
    result = change_passphrase(app.session(),
                               Path(new_passphrase_file) if new_passphrase_file else None)
    app.emit(result, lambda r: click.echo(f"Passphrase changed (slot {r['slot']} replaces "
                                          f"{r['replaced']})"))
