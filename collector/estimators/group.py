"""One EP group's estimators: assemble steps, compute their statistics, keep the
sliding windows, fit Hockney per phase and flag stragglers with a cause.

The same object serves the live collector (records arrive from many agents, ``update``
runs about once a second) and the offline ``simulate`` command (records arrive in
step order, ``update(final=True)`` at the end).
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from epwatch import costmodel, hockney
from epwatch.collector.estimators.buffer import StepBuffer
from epwatch.collector.estimators.config import EstimatorConfig
from epwatch.collector.estimators.counters import CounterMode
from epwatch.collector.estimators.network import link_slowdown
from epwatch.collector.estimators.report import (
    DropStats,
    GroupReport,
    PhaseReport,
    StragglerReport,
    SuspectLink,
)
from epwatch.collector.estimators.stats import (
    StepStats,
    _quiet_nanmedian,
    batch_evidence,
    durations,
    step_stats,
)
from epwatch.collector.estimators.tracker import CLOSED_FLAGS_KEPT, CauseTracker, Flag, LinkTracker
from epwatch.schema import PHASE_NAMES, Entered, IntervalColumns, PeerRows, Phase, RecordColumns

EvidenceFn = Callable[[str, str, int], list[str]]
_LAYER_BITS = 17  # heartbeat key: step << 17 | layer << 1 | phase
_MAX_EVIDENCE = 4
_SUSPECT_LINKS = 5  # reported per group (the worst)
_CHANGES_KEPT = 256  # flag openings and closings not yet taken (for the log)
_BATCH_LATE_STEPS = 8  # steps behind "this rank enters dispatch late" (batch cause)
_PEER_MATRICES = 8  # per-peer (layer, phase) matrices one step's network check may build


class BudgetError(ValueError):
    """The group's world size does not fit its memory budget."""


def _entered_key(step: np.ndarray, layer: np.ndarray, phase: np.ndarray) -> np.ndarray:
    return (step.astype(np.int64) << _LAYER_BITS) | (layer.astype(np.int64) << 1) | phase


class GroupEstimator:
    def __init__(
        self,
        ep_group: str,
        world_size: int,
        config: EstimatorConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.ep_group = ep_group
        self.P = world_size
        self.cfg = cfg = config or EstimatorConfig()
        self._clock = clock
        self.buffer = self._new_buffer(world_size, cfg)
        # Per-peer rows kept for steps still being assembled, and the P x P matrices a
        # step's network check builds, come out of the same budget.
        matrices = _PEER_MATRICES * world_size**2 * 8
        self._peer_budget = min(cfg.buffer_bytes // 4, matrices + (1 << 20))
        self._peer_bytes = 0
        self._assembly_bytes = self.buffer.max_bytes + self._peer_budget
        self.nodes = np.array([""] * world_size, dtype=object)
        self.local_device = np.full(world_size, -1, dtype=np.int64)
        self._known = np.zeros(world_size, dtype=bool)
        self._node_ids: dict[str, int] = {}
        self._rank_node_id = np.full(world_size, -1, dtype=np.int64)
        self.ignored_records = 0  # layers beyond max_layers
        self.restarts = 0  # the engine started counting steps again
        self._restarted = np.zeros(world_size, dtype=bool)
        self._fitted_steps = -1
        self.finalized_upto = -1
        self.newest_step = -1
        self.steps_done = 0
        self.incomplete_steps = 0
        self.late_records = 0
        self.dropped_total = np.zeros(world_size, dtype=np.int64)  # never reset: a counter
        self.window: deque[StepStats] = deque(maxlen=cfg.window_steps)
        self._peer: dict[int, list[PeerRows]] = {}
        self.trackers = {
            cause: CauseTracker(cause, world_size, cfg.sequential(cause))
            for cause in ("compute", "routing", "network", "batch")
        }
        self.links = LinkTracker(world_size, cfg.sequential("link"))
        self.run_time_s = 0.0  # seconds of this run, from the ranks' own clocks
        self._prev_step = -1
        self._prev_start_ns: np.ndarray | None = None
        self._prev_end_ns: np.ndarray | None = None
        self._changes: deque[tuple[str, Flag]] = deque(maxlen=_CHANGES_KEPT)
        self._entered = np.full(world_size, -1, dtype=np.int64)
        self._last_progress = clock()
        self._stalled_s = 0.0
        self.hangs: dict[int, Flag] = {}
        self._closed_hangs: deque[Flag] = deque(maxlen=CLOSED_FLAGS_KEPT)
        self._fits: dict[str, PhaseReport] = {}
        self.counter_mode: CounterMode | None = None  # created by the first interval record

    # -- ingest ----------------------------------------------------------------------
    def set_nodes(self, nodes: Mapping[int, str]) -> None:
        """Name each rank's node up front (offline runs); live ingest learns it."""
        for rank, node in nodes.items():
            self._set_node(np.array([rank]), node, None)

    @staticmethod
    def _new_buffer(world_size: int, cfg: EstimatorConfig) -> StepBuffer:
        """Steps assembled at once, sized for a 61-layer model within three quarters of
        the budget (the rest is for per-peer rows); at least two. The layer capacity is
        then what the budget leaves, at most ``max_layers``: the bound is strict, and a
        group that cannot fit two steps of one layer is refused."""
        budget = cfg.buffer_bytes - cfg.buffer_bytes // 4
        per_step = StepBuffer.bytes_per_step_for(world_size, layers=min(61, cfg.max_layers))
        slots = int(min(cfg.max_slots, max(2, budget // per_step)))
        layers = min(cfg.max_layers, budget // StepBuffer.bytes_per_step_for(world_size * slots, 1))
        if layers < 1:
            raise BudgetError(
                f"world_size {world_size} needs {2 * StepBuffer.bytes_per_step_for(world_size, 1)}"
                f" bytes for two steps of one layer; the group budget is {cfg.buffer_bytes}"
            )
        return StepBuffer(world_size, slots, int(layers))

    def ingest(self, records: RecordColumns, node: str | None = None) -> None:
        """Accept validated records (any ranks, any steps) of this group."""
        if not len(records):
            return
        if node is not None:
            self._set_node(records.rank, node, records.local_device)
        far_behind = int(records.step.max()) < self.finalized_upto - self.buffer.slots
        if far_behind and self._clock() - self._last_progress >= self.cfg.hang_after_s:
            # Only old steps arrive and nothing newer has for a while: the engine
            # restarted (without heartbeats to say so). Start a new run.
            self._new_run()
        late = records.step <= self.finalized_upto
        ignored = records.layer >= self.buffer.max_layers
        if late.any() or ignored.any():
            self.late_records += int(late.sum())
            self.ignored_records += int((ignored & ~late).sum())
            records = records.take(~(late | ignored))
            if not len(records):
                return
        span = self.buffer.slots // 2
        if int(records.step.max()) - int(records.step.min()) >= span:
            # A batch spanning more steps than we assemble at once goes in step order.
            records = records.take(np.argsort(records.step, kind="stable"))
            cuts = np.searchsorted(records.step, np.arange(records.step[0], records.step[-1], span))
            bounds = [*np.unique(cuts[1:]).tolist(), len(records)]
            start = 0
            for end in bounds:
                self._add(records.take(slice(start, end)))
                self._finalize_ready()
                start = end
        else:
            self._add(records)
        self._last_progress = self._clock()

    def _set_node(self, ranks: np.ndarray, node: str, devices: np.ndarray | None) -> None:
        """Learn where ranks run; cheap (an int compare) when nothing changed."""
        node_id = self._node_ids.setdefault(node, len(self._node_ids))
        moved = self._rank_node_id[ranks] != node_id
        if moved.any():
            ranks = ranks[moved]
            self._rank_node_id[ranks] = node_id
            self.nodes[ranks] = node
            self._known[ranks] = True
            if devices is not None:
                self.local_device[ranks] = devices[moved]

    def _add(self, records: RecordColumns) -> None:
        newest = max(self.newest_step, int(records.step.max()))
        # A backlog older than the steps being assembled (an agent catching up after a
        # reconnect) has no slot left: it is late, like a finalised step.
        behind = records.step <= newest - self.buffer.slots
        if behind.any():
            self.late_records += int(behind.sum())
            records = records.take(~behind)
            if not len(records):
                return
        # Make room: steps too far behind the newest are finalised (or dropped) now.
        for step in self.buffer.pending_steps():
            if newest - step < self.buffer.slots:
                break
            self._finalize(step)
        self.buffer.add(records)
        self.newest_step = max(self.newest_step, newest)

    def ingest_peer_rows(self, rows: PeerRows) -> None:
        if not len(rows) or not rows.wait_s.size:
            return
        # Only steps that can still be assembled, within the peer budget (counted
        # ignored otherwise): rows for far-future steps would never be freed.
        horizon = self._peer_horizon()
        for step in np.unique(rows.step):
            if step > self.finalized_upto:
                sel = rows.step == step
                size = int(sel.sum()) * self.P * 16
                if step > horizon or self._peer_bytes + size > self._peer_budget:
                    self.ignored_records += int(sel.sum())
                    continue
                self._peer_bytes += size
                self._peer.setdefault(int(step), []).append(
                    PeerRows(
                        rank=rows.rank[sel],
                        step=rows.step[sel],
                        layer=rows.layer[sel],
                        phase=rows.phase[sel],
                        wait_s=rows.wait_s[sel],
                        send_bytes=rows.send_bytes[sel]
                        if rows.send_bytes.size
                        else rows.send_bytes,
                    )
                )

    @property
    def memory_bytes(self) -> int:
        """What this group may hold: step assembly and per-peer rows (a hard bound from
        the start) and, once its counters report, counter mode's matrices."""
        counters = self.counter_mode.bytes if self.counter_mode is not None else 0
        return self._assembly_bytes + counters

    def counter_bytes_needed(self, local_experts: int) -> int:
        """What starting counter mode would add (0 once it runs)."""
        if self.counter_mode is not None and self.counter_mode.bytes:
            return 0
        return CounterMode.bytes_needed(self.P, local_experts)

    def ingest_intervals(
        self, rows: IntervalColumns, node: str | None = None, now_s: float | None = None
    ) -> None:
        """Counter-mode interval records (decode under CUDA graphs) of this group."""
        if not len(rows):
            return
        if self.counter_mode is None:
            self.counter_mode = CounterMode(self.P, self.cfg)
        if node is not None:
            self._set_node(rows.rank, node, None)
        self.counter_mode.ingest(rows, self._clock() if now_s is None else now_s)

    def _peer_horizon(self) -> float:
        """The newest step whose per-peer rows are kept (any before records arrive)."""
        newest = max(self.newest_step, self.finalized_upto)
        return newest + self.buffer.slots if newest >= 0 else math.inf

    def ingest_entered(
        self, entered: Entered, node: str | None = None, now_s: float | None = None
    ) -> None:
        """Heartbeats: the last collective each rank entered."""
        if not len(entered):
            return
        key = _entered_key(entered.step, entered.layer, entered.phase)
        # A rank whose heartbeat fell far behind what it entered before started counting
        # steps again: its engine restarted. Once every rank has, this is a new run.
        back = key < self._entered[entered.rank] - (self.buffer.slots << _LAYER_BITS)
        if back.any():
            self._restarted[entered.rank[back]] = True
            self._entered[entered.rank[back]] = key[back]
            if self._restarted[self._known | self._restarted].all():
                self._new_run()
                self._entered[entered.rank] = key
                return
        before = self._entered.max()
        np.maximum.at(self._entered, entered.rank, key)
        if self._entered.max() > before:
            self._last_progress = self._clock() if now_s is None else now_s

    def _new_run(self) -> None:
        """Forget the assembly state of a run whose engine restarted (its step numbers
        begin again); flags of the old run close, the window starts afresh."""
        self.restarts += 1
        self.buffer = StepBuffer(self.P, self.buffer.slots, self.buffer.max_layers)
        self._peer.clear()
        self._peer_bytes = 0
        self.window.clear()
        self.finalized_upto = self.newest_step = -1
        self._restarted[:] = False
        self._entered[:] = -1
        self._fitted_steps = -1
        self._prev_step = -1
        self._prev_start_ns = self._prev_end_ns = None
        for tracker in (*self.trackers.values(), self.links):
            tracker.reset()
        for rank in list(self.hangs):
            self._close_hang(rank)
        if self.counter_mode is not None:
            self.counter_mode.reset()
        self._last_progress = self._clock()

    # -- finalising steps ----------------------------------------------------------------
    def _finalize(self, step: int) -> None:
        taken = self.buffer.take(step)
        peers = self._peer.pop(step, [])
        horizon = self._peer_horizon()
        for stale in [s for s in self._peer if s < step or s > horizon]:
            del self._peer[stale]
        self._peer_bytes = sum(len(r) * self.P * 16 for rs in self._peer.values() for r in rs)
        self.finalized_upto = max(self.finalized_upto, step)
        if taken is None:
            self.incomplete_steps += 1
            return
        layers, arrays = taken
        d = durations(arrays)
        follows = self._prev_step == step - 1 and self._prev_end_ns is not None
        stats = step_stats(step, arrays, d, self._prev_end_ns if follows else None)
        self._advance_clock(stats)
        self.window.append(stats)
        self.dropped_total += stats.dropped
        self.steps_done += 1
        now = self.run_time_s
        self.trackers["compute"].push(step, now, stats.compute_ratio)
        self.trackers["routing"].push(step, now, stats.load_ratio)
        recent = list(itertools.islice(reversed(self.window), _BATCH_LATE_STEPS))[::-1]
        self.trackers["batch"].push(step, now, batch_evidence(recent), stats.batch_ratio)
        if peers:
            net = self._network(step, layers, arrays, d, peers)
            if net is not None:
                self.trackers["network"].push(step, now, net)

    def _advance_clock(self, stats: StepStats) -> None:
        """The run's time, from each rank's own clock: the median rank's time between
        the starts of consecutive analysed steps (clocks are never compared across
        ranks)."""
        if self._prev_start_ns is not None:
            elapsed = float(np.median(stats.start_ns - self._prev_start_ns)) * 1e-9
            if elapsed > 0:
                self.run_time_s += elapsed
        self._prev_start_ns, self._prev_end_ns = stats.start_ns, stats.end_ns
        self._prev_step = stats.step

    def _network(
        self,
        step: int,
        layers: np.ndarray,
        arrays: dict[str, np.ndarray],
        d: np.ndarray,
        peers: list[PeerRows],
    ) -> np.ndarray | None:
        """Each rank's NIC slowdown from every sampled layer of the step (median)."""
        position = {int(layer): i for i, layer in enumerate(layers)}
        matrices: dict[int, dict[int, np.ndarray]] = {}
        # Each (layer, phase) costs a P x P matrix: as many as the peer budget holds.
        room = self._peer_budget // (self.P * self.P * 8)
        for rows in peers:
            pairs = np.unique(np.stack([rows.layer, rows.phase.astype(np.int64)]), axis=1)
            for layer, phase in pairs.T.tolist():
                if layer not in position:
                    continue
                if phase not in matrices.get(layer, {}):
                    if room < 1:
                        continue
                    room -= 1
                sel = (rows.layer == layer) & (rows.phase == phase)
                m = matrices.setdefault(layer, {}).setdefault(
                    phase, np.full((self.P, self.P), np.nan)
                )
                m[rows.rank[sel]] = rows.wait_s[sel]
        latency = {}
        for phase in (Phase.DISPATCH, Phase.COMBINE):
            fit = self._fits.get(PHASE_NAMES[phase])
            latency[int(phase)] = fit.latency_s if fit is not None else math.nan
        found = []
        for layer, m in matrices.items():
            i = position[layer]
            found.append(
                link_slowdown(
                    m,
                    {ph: d[i, ph] for ph in m},
                    latency,
                    {ph: arrays["send_bytes"][i, ph] for ph in m},
                    {ph: arrays["recv_bytes"][i, ph] for ph in m},
                )
            )
        if not found:
            return None
        ranks = _quiet_nanmedian(np.stack([r for r, _ in found]), 0)
        cells = _quiet_nanmedian(np.stack([c for _, c in found]), 0)
        self.links.push(step, self.run_time_s, cells)
        return ranks

    def update(self, now_s: float | None = None, final: bool = False) -> None:
        """Finalise complete steps in order, refit, and check for a hang."""
        now = self._clock() if now_s is None else now_s
        self._finalize_ready(final)
        self._fit()
        self._check_hang(now, final)
        self.update_counters(now)

    def update_counters(self, now_s: float) -> None:
        """Counter mode's pass alone (an offline run whose records clock stands still)."""
        if self.counter_mode is not None:
            self.counter_mode.update(now_s)

    def _finalize_ready(self, final: bool = False) -> None:
        for step in self.buffer.pending_steps():
            if self.buffer.complete(step) and (step < self.newest_step or final):
                self._finalize(step)
            elif final or self.newest_step - step >= max(2, self.buffer.slots // 2):
                self._finalize(step)  # incomplete and left behind: dropped
            else:
                break

    # -- windows -------------------------------------------------------------------------
    def _fit(self) -> None:
        if not self.window or self._fitted_steps == self.steps_done:
            return
        self._fitted_steps = self.steps_done
        window = list(self.window)
        for phase in (Phase.DISPATCH, Phase.COMBINE):
            v = np.concatenate([s.volume_bytes[:, phase] for s in window])
            t = np.concatenate([s.transfer_s[:, phase] for s in window])
            sent = np.concatenate([s.send_bytes[:, phase] for s in window])
            if len(v) > self.cfg.max_fit_points:  # keep the newest points
                v, t = v[-self.cfg.max_fit_points :], t[-self.cfg.max_fit_points :]
            per_peer = costmodel.per_peer_message_bytes(float(np.median(sent)), self.P)
            transfer = float(np.median(t))
            try:
                f = hockney.fit(v, t)
                problem = hockney.untrustworthy(
                    v, f, self.cfg.fit_min_size_spread, self.cfg.fit_min_r2
                )
            except hockney.FitError as err:
                f, problem = None, str(err)
            if problem is not None:  # no L, BW_eff or regime from a fit we cannot trust
                self._fits[PHASE_NAMES[phase]] = PhaseReport(
                    r2=f.r2 if f is not None else math.nan,
                    n=len(v),
                    per_peer_message_bytes=per_peer,
                    transfer_s=transfer,
                    fit_problem=problem,
                )
                continue
            self._fits[PHASE_NAMES[phase]] = PhaseReport(
                latency_s=f.latency_s,
                bandwidth_Bps=f.bandwidth_Bps,
                r2=f.r2,
                n=f.n,
                regime=costmodel.regime(per_peer, max(f.latency_s, 0.0), f.bandwidth_Bps),
                crossover_bytes=f.crossover_bytes,
                per_peer_message_bytes=per_peer,
                transfer_s=transfer,
            )

    def _check_hang(self, now: float, final: bool) -> None:
        entered = self._entered
        self._stalled_s = max(0.0, now - self._last_progress)
        stalled = final or self._stalled_s >= self.cfg.hang_after_s
        known = entered >= 0
        laggards: list[int] = []
        if stalled and known.all():
            laggards = [int(r) for r in np.flatnonzero(entered < entered.max())]
        if not final and self._stalled_s < self.cfg.hang_after_s:
            self._stalled_s = 0.0 if self._stalled_s < 1.0 else self._stalled_s
        step_s = float(np.median([s.step_s for s in self.window])) if self.window else math.nan
        for rank in laggards:
            flag = self.hangs.get(rank)
            if flag is None:
                step = int(entered[rank] >> _LAYER_BITS)
                flag = self.hangs[rank] = Flag(rank, "hang", step, step, opened_step=step)
                self._changes.append(("opened", flag))
            flag.values.clear()
            if not final and step_s > 0:
                flag.values.append(self._stalled_s / step_s)
        for rank in [r for r in self.hangs if r not in laggards]:
            self._close_hang(rank)

    def _close_hang(self, rank: int) -> None:
        flag = self.hangs.pop(rank)
        flag.active = False
        self._closed_hangs.append(flag)
        self._changes.append(("cleared", flag))

    def _what_if(self, compute_s: float) -> dict[str, Any]:
        """The article's what-if at the measured point: does compute still cover the
        all-to-alls, how much larger must B grow to leave the latency-bound regime,
        and what doubling B or P would do. Dispatch and combine are averaged into one
        (L, BW_eff), the cost model's symmetric t_comm = 2 (L + V / BW_eff)."""
        fits = [self._fits.get(PHASE_NAMES[p]) for p in (Phase.DISPATCH, Phase.COMBINE)]
        if not all(f is not None and math.isfinite(f.bandwidth_Bps) for f in fits):
            return {}
        latency = max(0.0, float(np.mean([f.latency_s for f in fits])))
        bandwidth = 2.0 / sum(1.0 / f.bandwidth_Bps for f in fits)
        volume = fits[0].per_peer_message_bytes * max(self.P - 1, 1)
        now = costmodel.what_if(latency, bandwidth, volume, self.P, compute_s)

        def point(w: costmodel.WhatIf) -> dict[str, Any]:
            return {
                "t_comm_s": w.t_comm_s,
                "t_compute_s": w.t_compute_s,
                "overlap_covers_comm": w.overlap_covers_comm,
                "per_peer_message_bytes": w.per_peer_message_bytes,
                "regime": w.regime,
            }

        crossover = costmodel.crossover_bytes(latency, bandwidth)
        return {
            **point(now),
            "batch_scale_for_bandwidth_bound": crossover / now.per_peer_message_bytes,
            "double_batch": point(costmodel.what_if(latency, bandwidth, volume, self.P,
                                                    compute_s, batch_scale=2.0)),
            "double_ranks": point(costmodel.what_if(latency, bandwidth, volume, self.P,
                                                    compute_s, ranks_scale=2.0)),
        }  # fmt: skip

    # -- report --------------------------------------------------------------------------
    def _straggler(
        self, f: Flag, evidence: EvidenceFn | None = None, drops: DropStats | None = None
    ) -> StragglerReport:
        node, dev = str(self.nodes[f.rank]), int(self.local_device[f.rank])
        lines = self._own_evidence(f)
        counted = self.counter_mode is not None and self.counter_mode.owns(f)
        if counted:
            lines = self._counter_evidence(f)
        if f.cause == "routing":
            drops = drops or self._drops()
            if drops.fraction[f.rank] > 0:
                lines.insert(0, drops.line(f.rank))
        if evidence:
            lines += evidence(f.cause, node, dev)
        slowdown, low, high = f.interval()
        if f.cause == "hang":  # how long it has been stuck, in steps: no interval
            low = high = math.nan
        return StragglerReport(
            rank=f.rank,
            node=node,
            cause=f.cause,
            slowdown=slowdown,
            first_step=f.first_step,
            last_step=f.last_step,
            active=f.active,
            local_device=dev,
            evidence=tuple(lines[:_MAX_EVIDENCE]),
            slowdown_low=low,
            slowdown_high=high,
            opened_step=f.opened_step,
            source="counters" if counted else "records",
        )

    def _own_evidence(self, f: Flag) -> list[str]:
        """What the hook records themselves add: for a slow GPU, whether the rank's
        work before dispatch is slow per token too; for a large batch, how much later
        it enters dispatch."""
        if f.cause not in ("compute", "batch") or not self.window:
            return []
        recent = list(self.window)[-16:]
        pre_cost = float(_quiet_nanmedian(np.array([s.pre_dispatch_cost[f.rank] for s in recent])))
        pre = float(_quiet_nanmedian(np.array([s.pre_dispatch_ratio[f.rank] for s in recent])))
        if f.cause == "compute" and math.isfinite(pre_cost):
            return [f"per-token time before dispatch {pre_cost:.2f}x the group median"]
        if f.cause == "batch" and math.isfinite(pre):
            return [f"enters dispatch after {pre:.2f}x the median time before dispatch"]
        return []

    def take_flag_changes(self) -> list[tuple[str, StragglerReport]]:
        """Flags ("opened" or "cleared") since the last call, oldest first."""
        trackers = list(self.trackers.values())
        if self.counter_mode is not None:
            trackers += self.counter_mode.trackers.values()
            self._changes.extend(self.counter_mode.take_hang_changes())
        for tracker in trackers:
            opened, cleared = tracker.take_changes()
            self._changes.extend(("opened", f) for f in opened)
            self._changes.extend(("cleared", f) for f in cleared)
        out = [(event, self._straggler(f)) for event, f in self._changes]
        self._changes.clear()
        return out

    def report(
        self, evidence: EvidenceFn | None = None, include_closed: bool = False
    ) -> GroupReport:
        """The diagnosis: window statistics, fits and stragglers (active ones, or every
        flag raised during the run with ``include_closed``)."""
        flags: list[Flag] = list(self.hangs.values())
        if include_closed:
            flags += self._closed_hangs
        for tracker in self.trackers.values():
            flags += tracker.flags(include_closed)
        counted = self.counter_mode.flags(include_closed) if self.counter_mode else []
        seen = {(f.rank, f.cause, f.active) for f in flags}
        flags += [f for f in counted if (f.rank, f.cause, f.active) not in seen]
        drops = self._drops()
        stragglers = [
            self._straggler(f, evidence, drops)
            for f in sorted(flags, key=lambda f: (f.first_step, f.rank, f.cause))
        ]
        kw: dict = {}
        if self.window:
            w = list(self.window)
            gamma = np.concatenate([s.gamma for s in w])
            skew = np.concatenate([s.skew for s in w])
            kw = dict(
                gamma_median=float(_quiet_nanmedian(gamma)),
                gamma_p99=float(np.nanpercentile(gamma, 99))
                if np.isfinite(gamma).any()
                else math.nan,
                skew_median=float(_quiet_nanmedian(skew)),
                skew_max=float(np.nanmax(skew)) if np.isfinite(skew).any() else math.nan,
                time_lost_per_step_s=float(np.median([s.lost_s for s in w])),
                compute_slowdown=tuple(self.trackers["compute"].evidence.tolist()),
                load_ratio=tuple(self.trackers["routing"].evidence.tolist()),
                batch_ratio=tuple(
                    _quiet_nanmedian(np.stack([s.batch_ratio for s in w[-8:]]), 0).tolist()
                ),
                arrival_lag_s=tuple(
                    _quiet_nanmedian(np.stack([s.arrival_lag_s for s in w]), 0).tolist()
                ),
                whatif=self._what_if(float(np.nanmedian([s.compute_max_s for s in w]))),
            )
        return GroupReport(
            ep_group=self.ep_group,
            ranks=self.P,
            steps=self.steps_done,
            last_step=max(
                self.finalized_upto, self.counter_mode.newest_step if self.counter_mode else -1
            ),
            phases=dict(self._fits),
            stragglers=tuple(stragglers),
            stalled_s=max(
                self._stalled_s, self.counter_mode.stalled_s() if self.counter_mode else 0.0
            ),
            nodes=tuple(str(n) for n in self.nodes),
            incomplete_steps=self.incomplete_steps,
            late_records=self.late_records,
            ignored_records=self.ignored_records,
            suspect_links=self._suspect_links(include_closed),
            restarts=self.restarts,
            dropped_tokens_total=tuple(self.dropped_total.tolist()),
            dropped_fraction=tuple(drops.fraction.tolist()),
            drop_capacity=tuple(drops.capacity.tolist()),
            mode=self._mode(),
            intervals=self.counter_mode.intervals if self.counter_mode else 0,
            **kw,
        )

    def _drops(self) -> DropStats:
        """Share of each rank's routed slots that capacity dropped over the window."""
        if not self.window:
            return DropStats(np.zeros(self.P), np.full(self.P, np.nan))
        w = list(self.window)
        dropped = np.sum([s.dropped for s in w], axis=0)
        routed = np.sum([s.routed for s in w], axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            fraction = np.where(routed > 0, dropped / routed, 0.0)
        return DropStats(fraction, _quiet_nanmedian(np.stack([s.capacity for s in w]), 0))

    def _suspect_links(self, include_closed: bool) -> tuple[SuspectLink, ...]:
        """The worst suspect links, from the per-peer rows and the kernel counters."""
        flags = self.links.flags(include_closed)
        if self.counter_mode is not None:
            flags += self.counter_mode.links.flags(include_closed)
        flags = sorted(flags, key=lambda f: (not f.active, -f.slowdown))[:_SUSPECT_LINKS]
        return tuple(
            SuspectLink(f.src, f.dst, f.slowdown, f.first_step, f.last_step, f.active)
            for f in flags
        )

    def _mode(self) -> str:
        """Which records feed the diagnosis: per-collective, counters, or both."""
        counters = self.counter_mode is not None and self.counter_mode.intervals > 0
        records = self.steps_done > 0 or bool(self.buffer.pending_steps())
        return "mixed" if counters and records else "counters" if counters else "records"

    def _counter_evidence(self, flag: Flag) -> list[str]:
        """What the kernel counters show for a counter-mode flag."""
        assert self.counter_mode is not None
        if flag.cause == "routing":
            expert, ratio = self.counter_mode.hot_expert(flag.rank)
            if expert >= 0:
                return [f"hot expert {expert}: {ratio:.1f}x the mean expert's tokens per second"]
        if flag.cause == "hang":
            why = self.counter_mode.hang_why.get(flag.rank)
            return [why.format(step=flag.first_step)] if why else []
        return []
