"""sysfs I/O for the network samplers: one-read attributes and a cache of open files."""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

# A custom reader (tests inject one) gets a Path; the samplers call the default one
# with plain str paths, which spares building a Path per counter file every round.
FileReader = Callable[[Path], str]


def read_sysfs(path: str | os.PathLike[str]) -> str:
    """Text of one sysfs attribute, without the trailing newline the kernel adds.

    One ``os.open``/``os.read``/``os.close``: a sysfs attribute is at most a page, so
    the buffered file object of ``open()`` would only add cost (it was most of it).
    A directory opens but answers EISDIR on read, as with ``open()``.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 4096)
    finally:
        os.close(fd)
    return data.decode("ascii", "replace").strip()


def _max_open_files() -> int:
    """Files one sampler may keep open: a quarter of the soft descriptor limit, <= 2048."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 256
    if soft == resource.RLIM_INFINITY:
        return 2048
    return max(0, min(2048, soft // 4))


class SysfsCache:
    """Directory listings and open attribute files, kept between rounds.

    Counter values change every round, but which devices, ports and counter files
    exist changes only when hardware comes or goes. So listings are kept, and each
    attribute stays open and is re-read from offset 0 with one ``pread``: sysfs runs
    the attribute's ``show()`` again for a read at offset 0 (as for attributes one
    polls), and the open, the path walk and the close were most of a read's cost.

    Everything is dropped every ``refresh_s`` and at once after :meth:`invalidate`
    (the samplers call it when the set of devices changes or a listed file is gone).
    An attribute of a device that went away answers ENODEV: its file is closed and
    it reads as absent. A file that cannot be read is closed, so it is opened and
    tried again next round. At most ``max_open`` files stay open; beyond that a file
    is opened for each read. Regular files (a copied tree in tests) keep the content
    they had when opened if they are replaced rather than rewritten, until a refresh.
    """

    def __init__(
        self,
        refresh_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_open: int | None = None,
    ) -> None:
        self.refresh_s = refresh_s
        self.max_open = _max_open_files() if max_open is None else max_open
        self._clock = clock
        self._listings: dict[str, tuple[str, ...]] = {}
        self._files: dict[str, int] = {}
        self._expires = 0.0
        self.generation = 0  # +1 whenever listings are dropped: derived plans are stale

    def start_round(self) -> None:
        """Drop everything once ``refresh_s`` has passed since it was taken."""
        now = self._clock()
        if now >= self._expires:
            self.invalidate()

    def invalidate(self) -> None:
        self._listings.clear()
        self.close()
        self._expires = self._clock() + self.refresh_s
        self.generation += 1

    def close(self) -> None:
        """Close every kept file."""
        files, self._files = self._files, {}
        for fd in files.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # also at interpreter exit
            self.close()

    @property
    def open_files(self) -> int:
        return len(self._files)

    def listdir(self, path: str) -> tuple[str, ...]:
        """Sorted names in ``path`` (empty if it does not exist); other OSErrors raise."""
        names = self._listings.get(path)
        if names is None:
            try:
                names = tuple(sorted(os.listdir(path)))
            except FileNotFoundError:
                names = ()
            self._listings[path] = names
        return names

    def read(self, path: str) -> str:
        """Like :func:`read_sysfs`; ENODEV (the device went away) as FileNotFoundError."""
        fd = self._files.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            if len(self._files) < self.max_open:
                self._files[path] = fd
            else:
                try:
                    data = os.read(fd, 4096)
                finally:
                    os.close(fd)
                return data.decode("ascii", "replace").strip()
        try:
            data = os.pread(fd, 4096, 0)
        except OSError as exc:
            del self._files[path]
            os.close(fd)
            if exc.errno == errno.ENODEV:
                raise FileNotFoundError(errno.ENOENT, "device went away", path) from exc
            raise
        return data.decode("ascii", "replace").strip()


def sysfs_reader(reader: FileReader, cache: SysfsCache) -> Callable[[str], str]:
    """How a sampler reads a str path: ``cache`` for the default reader, else ``reader``
    (given a Path, as injected readers expect)."""
    if reader is read_sysfs:
        return cache.read
    return lambda path: reader(Path(path))


def describe_os_error(exc: OSError) -> str:
    """Short reason for a failed read (EINVAL from a counter the HCA does not support...)."""
    name = errno.errorcode.get(exc.errno or 0, "") if exc.errno else ""
    return f"{name} {exc.strerror}".strip() if exc.strerror else (name or str(exc))
