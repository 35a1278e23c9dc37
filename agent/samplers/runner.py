"""Runs every sampler each round, each in its own long-lived thread, with a deadline."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from epwatch.agent.samplers.base import Sampler, SamplerResult, log_once, run_sampler, status_points
from epwatch.catalogue import Point


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
                log_once(sampler.name, "still running from an earlier round", None)
                results.append(SamplerResult(sampler.name, False, busy, message))
                continue
            result = worker.wait(max(0.0, deadline - time.monotonic()))
            if result is None:
                message = f"timed out after {self.timeout_s:g} s"
                log_once(sampler.name, message, None)
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


def make_sample_round(
    samplers: Sequence[Sampler], interval_s: float
) -> tuple[Callable[[], tuple[list[Any], list[Any]]], Callable[[], None]]:
    """The agent's round function over ``samplers``, and how to release them.

    A :class:`RoundRunner` is kept across rounds so that a sampler stuck in a driver
    call is reported failed and not started again until that call returns; a round
    gets 80% of the interval (at least 0.2 s) before its stragglers count as failed.
    """
    runner = RoundRunner(samplers, timeout_s=max(0.2, 0.8 * interval_s))

    def one_round() -> tuple[list[Any], list[Any]]:
        results = runner.run()
        points: list[Any] = []
        for r in results:
            points.extend(r.points)
            points.extend(status_points(r))
        return points, results

    def close() -> None:
        runner.close()
        close_samplers(samplers)

    return one_round, close


def close_samplers(samplers: Iterable[Sampler]) -> None:
    """Release library handles (NVML, amdsmi) at shutdown; never raises."""
    for sampler in samplers:
        with contextlib.suppress(Exception):
            sampler.close()
