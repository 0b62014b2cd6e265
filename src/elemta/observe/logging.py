"""Logging setup: one logger tree `elemta.*`, plain text on stderr."""

from __future__ import annotations

import logging
import sys

from ..config import LoggingConfig

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def setup(cfg: LoggingConfig) -> None:
    root = logging.getLogger("elemta")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(_LEVELS[cfg.level])
    root.propagate = False
    # aiosmtpd logs every command at INFO under "mail.log"; keep its warnings only.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
