"""The sampler interface, the metric catalogue and the runner.

Modelled on Prometheus node_exporter: every source is one small class with a
``name`` and a ``collect()``; the runner times each one, turns any exception into a
``epwatch_sampler_up 0`` with a reason, and never lets one source abort the others.
Only names from the "Node samples" table of docs/contracts.md may be emitted, so the
catalogue below is the single place that knows kinds and help strings.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class Kind(enum.IntEnum):
    """Same numbers as ``MetricPoint.Kind`` on the wire."""

    GAUGE = 0
    COUNTER = 1


G, C = Kind.GAUGE, Kind.COUNTER

# name -> (kind, help). Mirrors the "Node samples" table of docs/contracts.md.
METRICS: dict[str, tuple[Kind, str]] = {
    "epwatch_sampler_up": (G, "1 if the sampler's last round succeeded, else 0"),
    "epwatch_sampler_duration_seconds": (G, "Time the sampler's last round took"),
    "epwatch_gpu_sm_clock_hertz": (G, "SM clock"),
    "epwatch_gpu_clock_event_active": (G, "1 while that clock-event (throttle) reason is active"),
    "epwatch_gpu_power_watts": (G, "Power draw"),
    "epwatch_gpu_energy_joules_total": (C, "Energy since driver load"),
    "epwatch_gpu_temperature_celsius": (G, "GPU temperature"),
    "epwatch_gpu_utilization_ratio": (G, "SM utilisation 0..1"),
    "epwatch_gpu_memory_used_bytes": (G, "Framebuffer used"),
    "epwatch_gpu_pcie_transmit_bytes_per_second": (G, "PCIe transmit throughput"),
    "epwatch_gpu_pcie_receive_bytes_per_second": (G, "PCIe receive throughput"),
    "epwatch_gpu_nvlink_transmit_bytes_total": (C, "NVLink data transmitted"),
    "epwatch_gpu_nvlink_receive_bytes_total": (C, "NVLink data received"),
    "epwatch_gpu_nvlink_errors_total": (C, "NVLink CRC/replay/recovery errors"),
    "epwatch_gpu_pcie_replays_total": (C, "PCIe replay counter"),
    "epwatch_gpu_ecc_errors_total": (C, "ECC errors"),
    "epwatch_gpu_remapped_rows": (G, "Row remapping"),
    "epwatch_gpu_xid_errors_total": (C, "XID events seen"),
    "epwatch_gpu_lost": (G, "1 when the GPU fell off the bus / is unreachable"),
    "epwatch_gpu_local_rank": (G, "The local rank mapped to the GPU"),
    "epwatch_nic_transmit_bytes_total": (C, "Bytes transmitted"),
    "epwatch_nic_receive_bytes_total": (C, "Bytes received"),
    "epwatch_nic_transmit_packets_total": (C, "Packets transmitted"),
    "epwatch_nic_receive_packets_total": (C, "Packets received"),
    "epwatch_nic_errors_total": (C, "NIC error counters"),
    "epwatch_nic_transmit_wait_total": (C, "IB port_xmit_wait: ticks with data but no credits"),
    "epwatch_nic_cnp_sent_total": (C, "RoCE congestion notifications sent (np_cnp_sent)"),
    "epwatch_nic_cnp_handled_total": (C, "RoCE congestion notifications handled (rp_cnp_handled)"),
    "epwatch_nic_ecn_marked_packets_total": (C, "RoCE packets received ECN-marked"),
    "epwatch_nic_retransmissions_total": (C, "Out-of-sequence, sequence errors, retries, timeouts"),
    "epwatch_nic_link_up": (G, "1 when the IB state is ACTIVE / the Ethernet operstate is up"),
    "epwatch_nic_physical_state": (G, "IB phys_state code (5 = LinkUp, 2 = Polling, 3 = Disabled)"),
    "epwatch_nic_link_rate_bytes_per_second": (G, "Link rate"),
}


@dataclass(frozen=True, slots=True)
class Point:
    """One sample value; converts to the wire's ``MetricPoint``.

    ``labels`` is not copied: samplers may share one mapping between points and
    rounds, so treat it as read-only.
    """

    name: str
    labels: Mapping[str, str]
    value: float
    kind: Kind = Kind.GAUGE
    help: str = ""

    def to_proto(self) -> Any:
        from protos import epwatch_pb2 as pb

        return pb.MetricPoint(
            name=self.name,
            labels=dict(self.labels),
            value=float(self.value),
            kind=int(self.kind),
            help=self.help,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "labels": dict(self.labels),
            "value": self.value,
            "kind": self.kind.name.lower(),
        }


def metric(name: str, value: float, **labels: str) -> Point:
    """A point of a catalogued metric; an unknown name is a bug and raises KeyError."""
    kind, help_text = METRICS[name]
    return Point(name, {k: str(v) for k, v in labels.items()}, float(value), kind, help_text)


class SamplerUnavailable(Exception):
    """The source cannot be read on this node (no library, no driver): a state, not a bug."""


class Sampler(ABC):
    """One source of node samples.

    ``collect`` returns what it could read; it raises only when nothing useful could be
    read at all. Per-series problems (one unreadable file) go to ``skipped`` instead.
    """

    name: str = "sampler"

    def __init__(self) -> None:
        self.skipped: list[str] = []

    @abstractmethod
    def collect(self) -> list[Point]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release library handles (NVML, amdsmi); default: nothing to release."""

    def skip(self, what: str, err: BaseException | str) -> None:
        """Record a series dropped this round (bounded; shown by ``--sample-once``)."""
        if len(self.skipped) < 64:
            self.skipped.append(f"{what}: {err}")


@dataclass(slots=True)
class SamplerResult:
    """Outcome of one sampler in one round."""

    name: str
    ok: bool
    duration_s: float
    error: str = ""
    points: list[Point] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def to_proto(self) -> Any:
        from protos import epwatch_pb2 as pb

        return pb.SamplerStatus(
            name=self.name, ok=self.ok, duration_s=self.duration_s, error=self.error
        )


_logged: set[tuple[str, str]] = set()
_logged_lock = threading.Lock()


def _log_once(sampler: str, message: str, exc: BaseException | None) -> None:
    """Log a sampler failure the first time we see it; repeats go to debug."""
    key = (sampler, message)
    with _logged_lock:
        first = key not in _logged
        if first:
            _logged.add(key)
    if not first:
        log.debug("sampler %s: %s", sampler, message)
    elif isinstance(exc, SamplerUnavailable) or exc is None:
        log.warning("sampler %s unavailable: %s", sampler, message)
    else:
        log.warning("sampler %s failed: %s", sampler, message, exc_info=exc)


def run_sampler(sampler: Sampler, clock: Callable[[], float] = time.perf_counter) -> SamplerResult:
    """Run one sampler, timing it and turning every exception into a failed status."""
    sampler.skipped = []
    start = clock()
    try:
        points = list(sampler.collect())
    except Exception as exc:  # one failing source never aborts the others
        message = str(exc) or type(exc).__name__
        if not isinstance(exc, SamplerUnavailable):
            message = f"{type(exc).__name__}: {message}"
        _log_once(sampler.name, message, exc)
        return SamplerResult(sampler.name, False, clock() - start, message, [], sampler.skipped)
    return SamplerResult(sampler.name, True, clock() - start, "", points, list(sampler.skipped))


def status_points(result: SamplerResult) -> list[Point]:
    """``epwatch_sampler_up`` and ``epwatch_sampler_duration_seconds`` for one result."""
    return [
        metric("epwatch_sampler_up", 1.0 if result.ok else 0.0, sampler=result.name),
        metric("epwatch_sampler_duration_seconds", result.duration_s, sampler=result.name),
    ]


class _Worker:
    """One sampler's long-lived thread: runs one ``collect()`` per request.

    Starting a thread per sampler per round costs more than the round itself for a
    cheap sampler; a parked thread costs nothing. ``busy`` stays True from the request
    until the call returns, however late, which is what keeps a stuck sampler from
    being started again.
    """

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.busy = False
        self.started = 0.0
        self.result: SamplerResult | None = None
        self._requested = False
        self._closed = False
        self._cond = threading.Condition()
        self.thread = threading.Thread(
            target=self._loop, name=f"epwatch-sampler-{sampler.name}", daemon=True
        )
        self.thread.start()

    def submit(self) -> bool:
        """Ask for one call; False (and nothing asked) while the previous one runs."""
        with self._cond:
            if self.busy:
                return False
            self.busy, self._requested = True, True
            self.result = None
            self.started = time.monotonic()
            self._cond.notify_all()
            return True

    def wait(self, timeout: float) -> SamplerResult | None:
        """The requested call's result, or None if it is still running after ``timeout``."""
        with self._cond:
            self._cond.wait_for(lambda: not self.busy, timeout)
            return None if self.busy else self.result

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: not self.busy, timeout)

    def close(self) -> None:
        """Let the thread end once idle (a stuck call keeps it until it returns)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._requested or self._closed)
                if not self._requested:
                    return
                self._requested = False
            result = run_sampler(self.sampler)
            with self._cond:
                self.result, self.busy = result, False
                self._cond.notify_all()


class RoundRunner:
    """Runs every sampler each round, each in its own thread, with a deadline.

    A sampler that overruns (an NVML call hanging on a GPU that fell off the bus is
    the classic case) is reported failed for that round and not started again until
    its previous call returns, so it can neither stall the round nor pile up threads.
    Each sampler has one worker thread for the runner's lifetime; :meth:`close` ends
    them.
    """

    def __init__(self, samplers: Iterable[Sampler], timeout_s: float) -> None:
        self.samplers = list(samplers)
        self.timeout_s = timeout_s
        self._workers: dict[int, _Worker] = {}  # by id() of the sampler

    def _worker(self, sampler: Sampler) -> _Worker:
        worker = self._workers.get(id(sampler))
        if worker is None or worker.sampler is not sampler:
            if worker is not None:
                worker.close()
            worker = self._workers[id(sampler)] = _Worker(sampler)
        return worker

    def run(self) -> list[SamplerResult]:
        """One round: every sampler's result, or why it has none, in sampler order.

        Samplers start one after another, each once the previous one returned or
        after ``grace_s``, whichever comes first: healthy samplers take milliseconds
        and then never compete for the GIL (which cost more CPU than it saved wall
        time), while a slow one delays the others' start by at most ``grace_s``.
        """
        workers = [self._worker(s) for s in self.samplers]
        for key in self._workers.keys() - {id(s) for s in self.samplers}:
            self._workers.pop(key).close()  # a sampler taken off the list
        deadline = time.monotonic() + self.timeout_s
        grace = self.grace_s
        busy_for: list[float | None] = []
        for worker in workers:
            if worker.submit():
                busy_for.append(None)
                worker.wait_idle(min(grace, max(0.0, deadline - time.monotonic())))
            else:
                busy_for.append(time.monotonic() - worker.started)
        results: list[SamplerResult] = []
        for sampler, worker, busy in zip(self.samplers, workers, busy_for, strict=True):
            if busy is not None:
                message = f"previous round still running after {busy:.1f} s"
                _log_once(sampler.name, "still running from an earlier round", None)
                results.append(SamplerResult(sampler.name, False, busy, message))
                continue
            result = worker.wait(max(0.0, deadline - time.monotonic()))
            if result is None:
                message = f"timed out after {self.timeout_s:g} s"
                _log_once(sampler.name, message, None)
                result = SamplerResult(sampler.name, False, self.timeout_s, message)
            results.append(result)
        return results

    @property
    def grace_s(self) -> float:
        """How long a sampler runs alone before the next one starts beside it."""
        return self.timeout_s / (2 * max(1, len(self.samplers)))

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no sampler is still running from an earlier round."""
        deadline = time.monotonic() + timeout
        return all(
            w.wait_idle(max(0.0, deadline - time.monotonic())) for w in self._workers.values()
        )

    def close(self) -> None:
        """End the worker threads (a stuck one ends when its call returns)."""
        for worker in self._workers.values():
            worker.close()
        self._workers.clear()


def collect_round(
    samplers: Iterable[Sampler], timeout_s: float | None = None
) -> tuple[list[Point], list[SamplerResult]]:
    """One round of every sampler: all points (status gauges included) and statuses.

    With ``timeout_s`` the samplers run in parallel threads and an overrunning one is
    reported failed; the daemon should keep a :class:`RoundRunner` instead so that an
    overrunning sampler is not started again while still stuck.
    """
    samplers = list(samplers)
    if timeout_s is None:
        results = [run_sampler(s) for s in samplers]
    else:
        runner = RoundRunner(samplers, timeout_s)
        try:
            results = runner.run()
        finally:
            runner.close()
    points: list[Point] = []
    for result in results:
        points.extend(result.points)
        points.extend(status_points(result))
    return points, results


# --- sysfs helpers -------------------------------------------------------------------

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
