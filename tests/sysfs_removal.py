"""Make a copied sysfs tree answer like sysfs when an attribute is removed.

A removed sysfs attribute answers ENODEV to a read through a file that was opened
before; a removed regular file would still read its old content. The samplers keep
attribute files open between rounds, so tests that remove files from the fixture
copy patch ``os.pread`` with :func:`removed_files_answer_enodev`.
"""

from __future__ import annotations

import errno
import os

import pytest


def removed_files_answer_enodev(monkeypatch: pytest.MonkeyPatch) -> None:
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(" (deleted)"):
            raise OSError(errno.ENODEV, "No such device")
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
