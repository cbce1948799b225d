"""The `lvbackup` command's entry point: Ctrl-C is handled before anything heavy is
imported (the command line's root group; its command's modules load when it runs, with a
Ctrl-C held until they have)."""

import os
import signal
import sys


def _interrupted_early(_signum: int, _frame: object) -> None:
    # Nothing has started yet: nothing to undo, so no unwinding (and no traceback).
    doc = '{"error": "interrupted", "exit_code": 130}' if "--json" in sys.argv[1:] \
        else "lvbackup: interrupted"
    os.write(2, (doc + "\n").encode())
    os._exit(130)


def main() -> None:
    signal.signal(signal.SIGINT, _interrupted_early)
    from .cli import main as run  # cli.main() installs the handlers of a running command
    run()


if __name__ == "__main__":   # bin/lvbackup: python3 -m lvbackup.launcher
    main()
