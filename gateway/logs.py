"""Logging setup shared by the master, the workers and the CLI tools."""
from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def setup(level: str = "info") -> None:
    """Log lines to stderr; idempotent (a forked worker calls it again)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
