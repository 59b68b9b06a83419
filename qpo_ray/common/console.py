"""The console's `qpo` logger: every "[qpo] ..." line of a run goes through
``logging.getLogger("qpo")`` so that a library user can quieten it
(``logging.getLogger("qpo").setLevel(logging.WARNING)``) or route it elsewhere, and the
`qpo` command's ``-q`` / ``-v`` flags set its level (`set_verbosity`).

By default the logger prints INFO and above to stdout with the ``[qpo] `` prefix, the
text the console showed before it was a logger (a logger with no handler would drop
INFO). Progress lines (qpo_ray.common.progress) follow the same level.
"""

from __future__ import annotations

import logging
import sys

NAME = "qpo"
_HANDLER = "qpo-console"


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (pytest's capture, a redirect)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _logger() -> logging.Logger:
    logger = logging.getLogger(NAME)
    if not any(h.get_name() == _HANDLER for h in logger.handlers):
        handler = _StdoutHandler()
        handler.set_name(_HANDLER)
        handler.setFormatter(logging.Formatter("[qpo] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False  # not twice when the root logger prints too
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)
    return logger


log = _logger()


def set_verbosity(verbosity: int) -> None:
    """-1 = warnings and errors only (-q), 0 = the run's lines, 1 = debug too (-v)."""
    log.setLevel({-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG))


def shows_info() -> bool:
    return log.isEnabledFor(logging.INFO)
