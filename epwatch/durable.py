"""Making a write survive a crash or a power loss: fsync a file or a folder (a rename
is durable only once its folder is synced). Used by the agent's spool folder and the
collector's recorder."""

from __future__ import annotations

import os


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a folder by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
