"""`--verbose`: lvbackup's log on stderr (every external command with its exit status and
duration, the change tracker's choices and reasons). One logger per module, all under
`lvbackup`; without --verbose nothing below a warning is shown."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s.%(msecs)03d %(name)s: %(message)s"

_handler: logging.Handler | None = None


def verbose() -> None:
    """Show lvbackup's DEBUG records on stderr (set up once per process)."""
    global _handler
    logger = logging.getLogger("lvbackup")
    logger.setLevel(logging.DEBUG)
    if _handler is None:
        _handler = logging.StreamHandler(sys.stderr)
        _handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
        logger.addHandler(_handler)
