"""The script nbdkit's Python plugin runs to serve a mapped backup:

    nbdkit python .../nbdkit_plugin.py python=3.11 path=DIRS config=FILE backup=ID lock=FILE
        [as_of=SECONDS]

(`as_of=`: the repository as it stood then, for a map under --as-of.)

nbdkit embeds its own Python, so this file is loaded as a script, not as part of the
lvbackup package: `python=` must match the version it runs under (the interpreter lvbackup
and its compiled dependencies were installed for) and `path=` (first) puts lvbackup's
environment on sys.path. Everything else is an export object: `export=instant` (first)
chooses `lvbackup.nbd.instant_export.InstantExport` (an instant restore's volume, read
and written), else `lvbackup.nbd.server.Export` (a backup, read-only).
"""

import site
import sys
from typing import Any

import nbdkit  # type: ignore[import-not-found]  # nbdkit's Python plugin provides it

API_VERSION = 2

_export: Any = None   # the export object, once lvbackup can be imported


def config(key, value):
    global _export
    if key == "python":
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        if value != here:
            raise RuntimeError(f"nbdkit's Python is {here} but lvbackup runs under Python "
                               f"{value}: install nbdkit-plugin-python built for {value}")
    elif key == "path":
        before = list(sys.path)
        for directory in value.split(":"):
            site.addsitedir(directory)
        sys.path[:] = [p for p in sys.path if p not in before] + before
    elif key == "export" and _export is None and value == "instant":
        from lvbackup.nbd.instant_export import InstantExport
        _export = InstantExport()
    else:
        if _export is None:
            from lvbackup.nbd.server import Export
            _export = Export()
        _export.config(key, value)


def config_complete():
    if _export is None:
        raise RuntimeError("no backup to serve: give config=, backup= and lock=")
    _export.config_complete()


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def get_ready():
    _export.get_ready()


def after_fork():
    _export.after_fork(nbdkit.shutdown)


def cleanup():
    if _export is not None:
        _export.cleanup()


def open(readonly):
    return 1


def get_size(h):
    return _export.size


def can_write(h):
    return _export.writable


def can_flush(h):
    return _export.writable


def can_fua(h):
    return nbdkit.FUA_EMULATE if _export.writable else nbdkit.FUA_NONE


def can_multi_conn(h):
    return True


def _errno_to_client(request, *args):
    # nbdkit sends the client the errno set here; the exception only logs.
    try:
        request(*args)
    except OSError as e:
        nbdkit.set_error(e.errno)
        raise


def pread(h, buf, offset, flags):
    _errno_to_client(_export.pread, buf, offset)


def pwrite(h, buf, offset, flags):
    _errno_to_client(_export.pwrite, buf, offset)


def flush(h, flags):
    _errno_to_client(_export.flush)
