"""Counter mode: the diagnosis from interval records (decode under CUDA graphs).

Under graphs there is no per-collective record, only what each rank's kernel counters
added over an interval: seconds waited for each source rank in dispatch and in
combine (a row of each wait matrix) and tokens received per local expert. Intervals
of different ranks are not aligned in time, so everything here is a rate on the rank's
own clock (seconds waited per second, tokens per second) compared across ranks, pooled
per tick (one estimator pass) and, like the record mode, never a clock difference
across hosts.

What each cause looks like (design §4):

- a **slow sender** (its NIC's transmit side): peers wait longer for its data in both
  dispatch and combine (its column), while it waits normally for theirs (its row);
- a **slow receiver** (its NIC's receive side): it waits longer for everyone, in both
  phases (its row);
- a **slow link**: one cell far above what its row and column predict;
- **late arrival**: a rank that enters a collective late makes every peer wait longer
  for its data (its column rises) and finds theirs already there (its row falls), by
  the same seconds. The ratios are diluted by the transfer time every wait includes,
  so lateness is measured in seconds: the smaller of the column's excess and the
  row's deficit, per second of the interval and per waiter, is the share of the
  group's time lost waiting for the rank. Late into combine: its experts are slow
  (``compute``; late into dispatch too: its attention as well, a slow GPU), unless its
  experts get more tokens than the floor of ``routing`` allows (then that is the
  cause); late into dispatch only: its own DP batch is larger (``batch``). The flag's
  slowdown is then 1 + that share (1.05: the group loses 5% of its time to the rank);
- **routing**: a rank's experts receive more tokens per second than the group's mean;
  the hottest local expert is named by its global id (``rank * local_experts + e``);
- a **hang**: every rank's counters stop advancing for ``hang_after_s`` (measured on
  each rank's own clock) while their probes go on reporting; the rank whose step
  counter stays behind is the one that never started the step (the engine calls
  ``probe.step()`` as each step starts), else the one whose probe went silent.

γ and the Hockney fit need per-collective times and are not available in this mode.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from epwatch.collector.estimators.config import EstimatorConfig
from epwatch.collector.estimators.network import cell_slowdown
from epwatch.collector.estimators.sequential import SequentialParams
from epwatch.collector.estimators.stats import _quiet_nanmedian, peer_median, peer_ratio
from epwatch.collector.estimators.tracker import CLOSED_FLAGS_KEPT, CauseTracker, Flag, LinkTracker
from epwatch.schema import IntervalColumns, RecordError

_BYTES_PER_VALUE = 8
_BEHIND = (
    "its step counter stayed at {step} while its peers started the next step; every "
    "rank's kernel counters stopped"
)
_SILENT = "its counter probe went silent (its GPU stuck?) while its peers' counters stopped"
LATE_MIN_EFFECT = 1.005  # compute flags: the group loses at least 0.5% of its time


@dataclass(frozen=True, slots=True)
class CounterTick:
    """What one estimator pass saw in the counters, per rank (NaN: not measured)."""

    send: np.ndarray  # [2, P] peers' waits for the rank's data over the group's (D, C)
    recv: np.ndarray  # [2, P] the rank's waits for everyone over the group's (D, C)
    late: np.ndarray  # [2, P] share of the group's time lost waiting for the rank (D, C)
    base: np.ndarray  # [2] the group's median wait for a peer, per second and waiter (D, C)
    load: np.ndarray  # [P] tokens per second over the group's mean
    hot_expert: np.ndarray  # [P] global id of the rank's busiest expert (-1 unknown)
    hot_expert_ratio: np.ndarray  # [P] that expert's tokens over the mean expert's
    cells: np.ndarray  # [P, P] link time over what its receiver's row and sender's column predict
    reported: np.ndarray  # [P] bool: intervals arrived this tick
    seconds: float = 0.0  # the time the tick covers, on the median reporting rank's clock

    def cause_evidence(self, routing_floor: float) -> dict[str, np.ndarray]:
        """Per-rank slowdown series for each cause (1 = nothing to see)."""
        send_d, send_c = self.send
        recv_d, recv_c = self.recv
        late_d, late_c = self.late
        load = np.where(np.isfinite(self.load), self.load, 1.0)
        # A rank whose lateness explains its column's rise is late, not a slow sender.
        excess_d, excess_c = np.fmax(send_d - 1.0, 0.0), np.fmax(send_c - 1.0, 0.0)
        late = (late_d > 0.5 * excess_d * self.base[0]) | (late_c > 0.5 * excess_c * self.base[1])
        sender = np.where(late, np.nan, np.fmin(send_d, send_c))
        receiver = np.fmin(recv_d, recv_c)
        # Late into combine: slow experts (a hot expert's extra load is routing's); its
        # lateness into dispatch counts as well, as far as it matches (a slow GPU is
        # slow in attention too; a larger batch only there is the batch cause).
        compute = np.where(load < routing_floor, 1.0 + late_c + np.fmin(late_d, late_c), 1.0)
        # A larger DP batch: peers wait longer for its dispatch data and it waits longer
        # for its tokens' results in combine, while the other two directions stay
        # normal (a slow NIC slows all four; a hot expert the other two).
        batch = np.fmin(send_d, recv_c) / np.fmax(np.fmax(send_c, recv_d), 1.0)
        return {
            "network": np.fmax(receiver, sender),
            "compute": compute,
            "batch": batch,
            "routing": load,
        }


def tick_params(cfg: EstimatorConfig, cause: str) -> SequentialParams:
    """The sequential test for counter-mode ticks. A tick pools every interval of one
    estimator pass (each a few hundred milliseconds of steps): much less noisy than
    one step and far fewer of them, so the counts are in ticks and small. Compute is
    measured as the share of the group's time lost to a late rank, so its floor is a
    share too."""
    params = cfg.sequential(cause)
    # Late arrival is a share of the group's time, not a ratio of costs: 0.5% is worth it.
    floor = LATE_MIN_EFFECT if cause == "compute" else params.min_effect
    return dataclasses.replace(
        params,
        min_effect=floor,
        window=min(params.window, 64),
        warmup=min(params.warmup, 4),
        burst_steps=min(params.burst_steps, 4),
        hold_steps=min(params.hold_steps, 3),
        clear_steps=min(params.clear_steps, 5),
    )


class CounterMode:
    """One EP group's interval records, pooled per estimator pass, and the flags they
    raise (``compute``, ``batch``, ``network``, ``routing``, ``hang``) and suspect
    links."""

    def __init__(self, world_size: int, cfg: EstimatorConfig) -> None:
        self.P = world_size
        self.cfg = cfg
        self.max_bytes = cfg.buffer_bytes  # the group's own bound (--group-buffer-bytes)
        self.bytes = 0  # what the accumulators and a pass's matrices take, once started
        self.local_experts = -1
        self.intervals = 0
        # Per tick, each rank's busiest expert and its ratio, [P] each (not the
        # whole tick, whose link matrix is P x P).
        self._hot: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=cfg.window_steps)
        self.trackers = {
            cause: CauseTracker(cause, world_size, tick_params(cfg, cause))
            for cause in ("compute", "batch", "network", "routing")
        }
        self.links = LinkTracker(world_size, tick_params(cfg, "link"))
        self.hangs: dict[int, Flag] = {}
        self._closed_hangs: deque[Flag] = deque(maxlen=CLOSED_FLAGS_KEPT)
        self._hang_changes: list[tuple[str, Flag]] = []
        self.hang_why: dict[int, str] = {}  # rank -> what pinned the hang on it
        self.run_time_s = 0.0  # the ranks' own time over the ticks (median rank)
        self._ticks_done = 0
        self._acc: dict[str, np.ndarray] | None = None
        self._fresh = False
        # Each rank's step counter (steps started) at its newest reading; -1 unknown.
        self.step = np.full(world_size, -1, dtype=np.int64)
        self._last_end_ns = np.full(world_size, -1, dtype=np.int64)
        self.reported_s = np.full(world_size, math.nan)  # when each rank last reported
        self.frozen_s = np.zeros(world_size)  # own-clock time without progress, so far
        self.seen = np.zeros(world_size, dtype=bool)

    @staticmethod
    def bytes_needed(world_size: int, local_experts: int) -> int:
        """The accumulators (two P x P wait matrices, tokens) and one pass's working
        matrices (about six P x P): what a group in counter mode adds."""
        matrices = 8 * world_size * world_size
        return (matrices + world_size * (local_experts + 1)) * _BYTES_PER_VALUE

    def _accumulators(self, local_experts: int) -> dict[str, np.ndarray]:
        if self._acc is not None:
            if local_experts != self.local_experts:
                raise RecordError(
                    "world_size_changed",
                    f"interval records with {local_experts} local experts; the group has "
                    f"{self.local_experts}",
                )
            return self._acc
        need = self.bytes_needed(self.P, local_experts)
        if need > self.max_bytes:
            raise RecordError(
                "too_large",
                f"counter mode at P={self.P} needs {need >> 20} MiB, over the group's "
                f"budget of {self.max_bytes >> 20} MiB",
            )
        P = self.P
        self.local_experts = local_experts
        self.bytes = need
        self._acc = {
            "dispatch": np.zeros((P, P)),
            "combine": np.zeros((P, P)),
            "tokens": np.zeros((P, local_experts)),
            "seconds": np.zeros(P),
        }
        return self._acc

    def ingest(self, rows: IntervalColumns, now_s: float) -> None:
        """Validated interval records of any ranks of this group."""
        if not len(rows):
            return
        acc = self._accumulators(rows.local_experts)
        seconds = (rows.end_ns - rows.start_ns) * 1e-9
        np.add.at(acc["dispatch"], rows.rank, rows.dispatch_wait_s)
        np.add.at(acc["combine"], rows.rank, rows.combine_wait_s)
        np.add.at(acc["tokens"], rows.rank, rows.expert_tokens)
        np.add.at(acc["seconds"], rows.rank, seconds)
        progressed = (rows.expert_tokens.sum(1) > 0) | (rows.dispatch_wait_s.sum(1) > 0) | (
            rows.combine_wait_s.sum(1) > 0
        )
        for rank, moved, span in zip(
            rows.rank.tolist(), progressed.tolist(), seconds.tolist(), strict=True
        ):
            self.frozen_s[rank] = 0.0 if moved else self.frozen_s[rank] + span
        # Each rank's newest reading (by its own clock) says where its engine is: an
        # engine that restarted counts from 0 again, and that must show.
        for i in np.argsort(rows.end_ns, kind="stable").tolist():
            rank = int(rows.rank[i])
            if rows.end_ns[i] >= self._last_end_ns[rank]:
                self._last_end_ns[rank] = int(rows.end_ns[i])
                self.step[rank] = int(rows.step[i])
        self.reported_s[rows.rank] = now_s
        self.seen[rows.rank] = True
        self.intervals += len(rows)
        self._fresh = True

    def tick(self) -> CounterTick | None:
        """Pool what arrived since the last pass into one tick (None if nothing did)."""
        if not self._fresh or self._acc is None:
            return None
        self._fresh = False
        acc = self._acc
        seconds = acc["seconds"]
        reported = seconds > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            per_s = np.where(reported, 1.0 / seconds, np.nan)
            send, recv, late, base, cells = [], [], [], [], None
            for phase in ("dispatch", "combine"):
                # Seconds waited per second, per waiter (one per local expert).
                rate = acc[phase] * per_s[:, None] / max(self.local_experts, 1)
                np.fill_diagonal(rate, np.nan)
                col, row = _quiet_nanmedian(rate, axis=0), _quiet_nanmedian(rate, axis=1)
                # Each rank against its peers (with four ranks a straggler's own value
                # would pull a plain median towards it).
                send.append(peer_ratio(col))
                recv.append(peer_ratio(row))
                excess = col - peer_median(col)
                deficit = peer_median(row) - row
                late.append(np.fmax(np.fmin(excess, deficit), 0.0))
                base.append(_quiet_nanmedian(col))
                cell = cell_slowdown(np.where(rate > 0, rate, np.nan))
                cells = cell if cells is None else np.fmax(cells, cell)
            tokens = acc["tokens"] * per_s[:, None]
            per_rank = tokens.sum(axis=1)
            load = per_rank / np.nanmean(per_rank) if np.isfinite(per_rank).any() else per_rank
            mean_expert = np.nanmean(tokens) if np.isfinite(tokens).any() else math.nan
            hottest = np.argmax(np.nan_to_num(tokens, nan=-1.0), axis=1)
            hot_ratio = tokens[np.arange(self.P), hottest] / mean_expert
        hot_id = np.where(reported, np.arange(self.P) * self.local_experts + hottest, -1)
        tick_s = float(np.median(seconds[reported])) if reported.any() else 0.0
        for a in acc.values():
            a[:] = 0.0
        tick = CounterTick(
            send=np.stack(send),
            recv=np.stack(recv),
            late=np.stack(late),
            base=np.asarray(base, dtype=float),
            load=load,
            hot_expert=hot_id,
            hot_expert_ratio=hot_ratio,
            cells=cells if cells is not None else np.full((self.P, self.P), np.nan),
            reported=reported,
            seconds=tick_s,
        )
        self._hot.append((tick.hot_expert, tick.hot_expert_ratio))
        return tick

    def update(self, now_s: float) -> None:
        """Pool the new intervals into a tick, feed the flags, look for a hang."""
        tick = self.tick()
        if tick is not None:
            self._ticks_done += 1
            at = self.newest_step if self.newest_step >= 0 else self._ticks_done
            self.run_time_s += tick.seconds
            for cause, values in tick.cause_evidence(self.cfg.routing_min_effect).items():
                self.trackers[cause].push(at, self.run_time_s, values)
            self.links.push(at, self.run_time_s, tick.cells)
            self._check_hang(tick, now_s, at)

    def _check_hang(self, tick: CounterTick, now_s: float, at: int) -> None:
        alive = tick.reported
        stalled = bool(alive.any() and (self.frozen_s[alive] >= self.cfg.hang_after_s).all())
        suspects = self.hang_suspects(now_s, 2 * self.cfg.hang_after_s) if stalled else []
        for rank in suspects:
            if rank not in self.hangs:
                # Behind: the step it never started; silent: the one it was in.
                started = int(self.step[rank])
                silent = self.hang_why.get(rank) == _SILENT
                stuck = at if started < 0 else started - 1 if silent else started
                self.hangs[rank] = Flag(rank, "hang", stuck, stuck, opened_step=at)
                self._hang_changes.append(("opened", self.hangs[rank]))
            self.hangs[rank].last_step = at
        for rank in [r for r in self.hangs if r not in suspects]:
            flag = self.hangs.pop(rank)
            flag.active = False
            self._closed_hangs.append(flag)
            self._hang_changes.append(("cleared", flag))

    @property
    def newest_step(self) -> int:
        """The index of the newest step any rank started (counters count steps
        started; records number them from 0), -1 when none reported one."""
        return int(self.step.max()) - 1 if (self.step > 0).any() else -1

    def reset(self) -> None:
        """A new run (the engine restarted): flags close, counts start again."""
        for tracker in (*self.trackers.values(), self.links):
            tracker.reset()
        for rank in list(self.hangs):
            flag = self.hangs.pop(rank)
            flag.active = False
            self._closed_hangs.append(flag)
            self._hang_changes.append(("cleared", flag))
        self.step[:] = -1
        self._last_end_ns[:] = -1
        self.frozen_s[:] = 0.0
        self._fresh = False
        if self._acc is not None:
            for a in self._acc.values():
                a[:] = 0.0

    def take_hang_changes(self) -> list[tuple[str, Flag]]:
        """Hang flags opened and cleared since the last call."""
        out, self._hang_changes = self._hang_changes, []
        return out

    def stalled_s(self) -> float:
        """How long the group's counters have not advanced (the median reporting
        rank's own time), while a hang is pinned; else 0."""
        if not self.hangs or not self.seen.any():
            return 0.0
        return float(np.median(self.frozen_s[self.seen]))

    def owns(self, flag: Flag) -> bool:
        """Whether the flag was raised by the counters (not the per-collective records)."""
        if flag.cause == "hang":
            return any(f is flag for f in [*self.hangs.values(), *self._closed_hangs])
        tracker = self.trackers.get(flag.cause)
        return tracker is not None and any(
            f is flag for f in [*tracker.active.values(), *tracker.closed]
        )

    def flags(self, include_closed: bool) -> list[Flag]:
        out = list(self.hangs.values())
        if include_closed:
            out += self._closed_hangs
        for tracker in self.trackers.values():
            out += tracker.flags(include_closed)
        return out

    def hot_expert(self, rank: int) -> tuple[int, float]:
        """The rank's busiest expert (global id) over the window, and its load over the
        mean expert's."""
        ids = [int(hot[rank]) for hot, _ in self._hot if hot[rank] >= 0]
        if not ids:
            return -1, math.nan
        expert = max(set(ids), key=ids.count)
        ratios = [ratio[rank] for hot, ratio in self._hot if hot[rank] == expert]
        return expert, float(_quiet_nanmedian(np.asarray(ratios, dtype=float)))

    def hang_suspects(self, now_s: float, silent_after_s: float) -> list[int]:
        """Who a stall is pinned on: ranks whose step counter is behind the others'
        (they never started the step the rest are stuck in), else ranks whose probes
        went silent while the others report."""
        known = self.step >= 0
        if known.sum() >= 2 and self.step[known].min() < self.step[known].max():
            behind = [int(r) for r in np.flatnonzero(known & (self.step < self.step.max()))]
            self.hang_why.update(dict.fromkeys(behind, _BEHIND))
            return behind
        quiet = self.seen & (now_s - self.reported_s > silent_after_s)
        if quiet.any() and not quiet.all():
            silent = [int(r) for r in np.flatnonzero(quiet)]
            self.hang_why.update(dict.fromkeys(silent, _SILENT))
            return silent
        return []
