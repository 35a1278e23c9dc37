"""Vectorised, deterministic simulation of a Wide-EP group's hook records.

Timing follows the cost model (``epwatch.costmodel``) with noise:

* attention (data-parallel): each rank holds its own share ``T_r`` of the step's
  batch (jittered across ranks) and spends ``fixed + ns_per_token * T_r`` before
  each dispatch, times its speed (slow GPU, drift, whole-step spikes);
* dispatch: each rank sends ``T_r k d s`` bytes and receives ``n_r d s`` (its routed
  slots); data from rank j reaches rank i after ``L + max(tx_j, rx_i)`` scaled by one
  lognormal draw per collective, where ``tx``/``rx`` are bytes over the rank's NIC
  bandwidth. Every rank leaves when the last sender's data has arrived.
* expert compute: ``x_r = ns_per_token * n_r`` times the rank's speed, a step factor
  shared by every rank, independent lognormal noise and rare 2-5x spikes; then
  combine, the same transfer model in the other direction.

Steps are generated in fixed chunks, each with its own seeded generator, so a run is
reproducible whatever the consumer does. Every rank has its own clock offset: the
records carry rank-local times, as real hooks would, so no estimator can compare
clocks across ranks by accident.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from epwatch import costmodel
from epwatch.schema import Entered, PeerRows, Phase, RecordColumns
from epwatch.simulator.scenario import Fault, Scenario

CHUNK_STEPS = 16
_STEP_GAP_S = 200e-6  # scheduler work between forward passes


def _lognormal(rng: np.random.Generator, cv: float, shape: tuple[int, ...]) -> np.ndarray:
    """Multiplicative noise with mean 1 and coefficient of variation ``cv``."""
    if cv <= 0:
        return np.ones(shape)
    sigma2 = np.log1p(cv * cv)
    return rng.lognormal(-sigma2 / 2, np.sqrt(sigma2), shape)


@dataclass
class StepChunk:
    """Consecutive steps of the simulation as dense arrays.

    Shapes: ``[S, L, 2, P]`` for per-rank per-collective values (phase axis 0 =
    dispatch, 1 = combine), ``[S, L, P]`` for per-rank per-layer values. ``valid``
    masks collectives that did not happen (a hang).
    """

    steps: np.ndarray  # [S]
    enter_s: np.ndarray  # true time, seconds
    exit_s: np.ndarray
    send_bytes: np.ndarray
    recv_bytes: np.ndarray
    recv_tokens: np.ndarray  # [S, L, P], dispatch
    compute_s: np.ndarray  # [S, L, P], true expert compute x
    valid: np.ndarray  # [S, L, 2, P] bool
    peer_rows: PeerRows
    peer_true_link_s: np.ndarray  # [rows, P], the per-link transfer times behind wait_s
    entered: Entered  # each rank's last entered collective at the end of the chunk
    hung: bool = False
    # Counter mode only ([probe] mode = "counters"), per step, summed over layers:
    counter_waits_s: np.ndarray | None = None  # [S, 2, P, P] rank i's wait for j's data
    expert_tokens: np.ndarray | None = None  # [S, P, E / P] tokens per local expert


class Simulation:
    """Generates a scenario's steps chunk by chunk (see :meth:`chunks`)."""

    def __init__(self, scenario: Scenario) -> None:
        self.s = scenario
        c, m = scenario.cluster, scenario.model
        self.P, self.L, self.E = c.ranks, m.layers, m.experts
        self.slot_bytes = m.hidden * m.bytes_per_elem
        self.latency_s = scenario.network.latency_us * 1e-6
        self.bandwidth_Bps = scenario.network.bandwidth_gbps * 1e9
        clock_rng = np.random.default_rng([scenario.seed, 0xC10C])
        # Rank-local clocks: different offsets of up to hours, as hosts have.
        self.clock_offset_s = clock_rng.uniform(100.0, 10_000.0, self.P)
        self.local_device = np.arange(self.P) % c.ranks_per_node
        self.hang: Fault | None = next((f for f in scenario.faults if f.kind == "hang"), None)
        self.last_step = scenario.steps - 1 if self.hang is None else self.hang.start_step
        drift_rng = np.random.default_rng([scenario.seed, 0xD81F])
        self._drift_phase = drift_rng.uniform(0, 2 * np.pi, (3, self.P))

    # -- fault helpers -------------------------------------------------------------
    def _rank_factor(self, kind: str, steps: np.ndarray) -> np.ndarray:
        """[S, P] multiplicative factor of every fault of ``kind`` active at each step."""
        out = np.ones((len(steps), self.P))
        for f in self.s.faults:
            if f.kind == kind:
                out[steps >= f.start_step, f.rank] *= f.factor
        return out

    def _expert_probs(self, rng: np.random.Generator, steps: np.ndarray) -> np.ndarray:
        """[S, L, E] routing probabilities over experts."""
        S, L, E = len(steps), self.L, self.E
        w = self.s.workload
        if w.routing == "zipf":
            # Popularity by Zipf's law, shuffled per step and layer: batches differ in
            # which experts they favour, so no rank is hot on average.
            base = 1.0 / np.arange(1, E + 1) ** w.zipf_s
            order = np.argsort(rng.random((S, L, E)), axis=-1)
            p = base[order]
            p /= p.sum(-1, keepdims=True)
        else:
            p = np.full((S, L, E), 1.0 / E)
        for f in self.s.faults:
            if f.kind == "hot_expert":
                on = steps >= f.start_step
                p[on] *= 1.0 - f.share
                p[on, :, f.expert] += f.share
        return p

    # -- one collective ------------------------------------------------------------
    def _slow_links(self, steps: np.ndarray) -> list[tuple[np.ndarray, int, int, float]]:
        """(active steps, rank, peer, factor) of each slow_link fault."""
        return [
            (steps >= f.start_step, f.rank, f.peer, f.factor)
            for f in self.s.faults
            if f.kind == "slow_link"
        ]

    def _transfer(
        self,
        enter: np.ndarray,
        send: np.ndarray,
        recv: np.ndarray,
        bw: np.ndarray,
        eta: np.ndarray,
        slow_links: list[tuple[np.ndarray, int, int, float]] = (),
    ) -> np.ndarray:
        """Exit time [S] of an all-to-all everyone leaves when the last data arrives."""
        tx, rx = send / bw, recv / bw
        link = self.latency_s + np.maximum(tx, rx.max(axis=1, keepdims=True))
        for on, a, b, factor in slow_links:  # that pair's data, both ways, takes longer
            for src, dst in ((a, b), (b, a)):
                pair = (self.latency_s + np.maximum(tx[:, src], rx[:, dst])) * factor
                link[:, src] = np.where(on, np.maximum(link[:, src], pair), link[:, src])
        return (enter + link * eta[:, None]).max(axis=1)

    # -- chunks --------------------------------------------------------------------
    def chunks(self) -> Iterator[StepChunk]:
        start_time = 0.0
        for first in range(0, self.last_step + 1, CHUNK_STEPS):
            steps = np.arange(first, min(first + CHUNK_STEPS, self.last_step + 1))
            chunk, end_time = self._chunk(steps, start_time)
            start_time = end_time
            yield chunk

    def _drift(self, steps: np.ndarray) -> np.ndarray:
        """[S, P] each rank's slow speed wander: a sum of three slow sines with random
        phases per rank (a function of the step, so chunks join up seamlessly)."""
        c = self.s.compute
        if c.drift_cv <= 0:
            return np.ones((len(steps), self.P))
        periods = c.drift_steps * np.array([1.0, 0.43, 2.3])
        arg = 2 * np.pi * steps[:, None, None] / periods[None, :, None] + self._drift_phase
        return np.exp(c.drift_cv * np.sqrt(2 / 3) * np.sin(arg).sum(axis=1))

    def _spikes(self, rng: np.random.Generator, prob: float, shape: tuple[int, ...]) -> np.ndarray:
        """Heavy-tailed noise: a factor of 1, or with probability ``prob`` 2-5x."""
        if prob <= 0:
            return np.ones(shape)
        c = self.s.compute
        hit = rng.random(shape) < prob
        return np.where(hit, rng.uniform(c.spike_min, c.spike_max, shape), 1.0)

    def _chunk(self, steps: np.ndarray, start_time: float) -> tuple[StepChunk, float]:
        s = self.s
        rng = np.random.default_rng([s.seed, int(steps[0]) // CHUNK_STEPS])
        # The realistic-noise draws come from their own stream, so that turning them on
        # or off leaves the routing, compute and network draws as they were.
        extra = np.random.default_rng([s.seed, int(steps[0]) // CHUNK_STEPS, 0xE7])
        S, L, P = len(steps), self.L, self.P
        k, w, c, a = s.model.topk, s.workload, s.compute, s.attention
        # The step's global batch is shared; each rank's data-parallel share varies.
        batch = w.batch_tokens * (1 + w.batch_jitter * rng.uniform(-1, 1, S))
        local = batch[:, None] / P * _lognormal(extra, w.rank_batch_jitter, (S, P))
        tokens = np.maximum(np.round(local * self._rank_factor("batch_imbalance", steps)), 1)
        p_expert = self._expert_probs(rng, steps)  # [S, L, E]
        q = p_expert.reshape(S, L, P, self.E // P).sum(-1)
        slots = (tokens.sum(axis=1) * k).astype(np.int64)  # [S]
        n = rng.multinomial(np.broadcast_to(slots[:, None], (S, L)), q)
        n = n.astype(np.float64)  # [S, L, P]
        bw = self.bandwidth_Bps / self._rank_factor("slow_nic", steps)  # [S, P]
        # A rank's speed: its fault, its drift, and now and then a whole slow step.
        gpu = (
            self._rank_factor("slow_gpu", steps)
            * self._drift(steps)
            * self._spikes(extra, c.rank_spike_prob, (S, P))
        )
        shared = _lognormal(extra, c.shared_cv, (S,))[:, None, None]
        x = (
            c.ns_per_token
            * 1e-9
            * n
            * gpu[:, None, :]
            * shared
            * _lognormal(rng, c.noise_cv, (S, L, P))
            * self._spikes(extra, c.spike_prob, (S, L, P))
        )
        # Attention before each dispatch: follows the rank's own batch and speed.
        gap = (
            (a.fixed_us * 1e-6 + a.ns_per_token * 1e-9 * tokens)[:, None, :]
            * gpu[:, None, :]
            * shared
            * _lognormal(extra, a.noise_cv, (S, L, P))
        )
        eta = _lognormal(rng, s.network.noise_cv, (S, L, 2)) * self._spikes(
            extra, s.network.spike_prob, (S, L, 2)
        )
        dispatch_send = tokens * k * self.slot_bytes  # [S, P]

        enter = np.empty((S, L, 2, P))
        exit_ = np.empty((S, L, 2, P))
        send = np.empty((S, L, 2, P))
        recv = np.empty((S, L, 2, P))
        t = gap[:, 0]
        slow = self._slow_links(steps)
        for layer in range(L):
            routed = n[:, layer] * self.slot_bytes  # [S, P] bytes of routed slots
            send[:, layer, 0], recv[:, layer, 0] = dispatch_send, routed
            send[:, layer, 1], recv[:, layer, 1] = routed, dispatch_send
            enter[:, layer, 0] = t
            done = self._transfer(t, dispatch_send, routed, bw, eta[:, layer, 0], slow)
            exit_[:, layer, 0] = done[:, None]
            enter[:, layer, 1] = done[:, None] + x[:, layer]
            done = self._transfer(
                enter[:, layer, 1], routed, dispatch_send, bw, eta[:, layer, 1], slow
            )
            exit_[:, layer, 1] = done[:, None]
            if layer + 1 < L:
                t = done[:, None] + gap[:, layer + 1]
        step_len = exit_[:, -1, 1, 0] + _STEP_GAP_S
        step_start = start_time + np.concatenate([[0.0], np.cumsum(step_len)[:-1]])
        enter += step_start[:, None, None, None]
        exit_ += step_start[:, None, None, None]

        valid = np.ones((S, L, 2, P), dtype=bool)
        hung = False
        if self.hang is not None and steps[-1] == self.hang.start_step:
            valid[-1, self.hang.layer :] = False
            hung = True
        rows, true_link = self._peer_rows(rng, steps, enter, exit_, send, recv, q, bw, eta, valid)
        counters: dict[str, np.ndarray] = {}
        if s.probe.mode == "counters":
            counters["counter_waits_s"] = self._counter_waits(
                steps, enter, exit_, send, recv, bw, eta, valid
            )
            counters["expert_tokens"] = self._expert_tokens(n, p_expert)
        chunk = StepChunk(
            steps=steps,
            enter_s=enter,
            exit_s=exit_,
            send_bytes=send,
            recv_bytes=recv,
            recv_tokens=n,
            compute_s=x,
            valid=valid,
            peer_rows=rows,
            peer_true_link_s=true_link,
            entered=self._entered(int(steps[-1]), hung),
            hung=hung,
            **counters,
        )
        return chunk, float(step_start[-1] + step_len[-1])

    def _entered(self, last_step: int, hung: bool) -> Entered:
        P, L = self.P, self.L
        step = np.full(P, last_step)
        layer = np.full(P, L - 1)
        phase = np.full(P, int(Phase.COMBINE))
        if hung:
            h = self.hang
            layer[:] = h.layer
            phase[:] = int(Phase.DISPATCH)
            if h.layer == 0:
                step[h.rank], layer[h.rank] = last_step - 1, L - 1
            else:
                layer[h.rank] = h.layer - 1
            phase[h.rank] = int(Phase.COMBINE)
        return Entered(
            rank=np.arange(P, dtype="<i4"),
            step=step.astype("<i8"),
            layer=layer.astype("<i4"),
            phase=phase.astype("<u1"),
        )

    def _peer_rows(
        self,
        rng: np.random.Generator,
        steps: np.ndarray,
        enter: np.ndarray,
        exit_: np.ndarray,
        send: np.ndarray,
        recv: np.ndarray,
        q: np.ndarray,
        bw: np.ndarray,
        eta: np.ndarray,
        valid: np.ndarray,
    ) -> tuple[PeerRows, np.ndarray]:
        """Per-peer wait rows on sampled steps: one layer per sample, both phases.

        ``wait[i, j]`` is how long rank i waited, from entering, for rank j's data
        (DeepEP's low-latency ``*_wait_recv_cost_stats``). Sampling one layer per
        sampled step keeps this O(P^2) data affordable at P = 1024.
        """
        every = self.s.probe.peer_sample_every
        P = self.P
        keys: dict[str, list[np.ndarray]] = {"rank": [], "step": [], "layer": [], "phase": []}
        waits, sends, links = [], [], []
        for si, step in enumerate(steps):
            if step % every:
                continue
            layer = int(step // every) % self.L
            if not valid[si, layer].all():
                continue
            for phase in (0, 1):
                e = enter[si, layer, phase]  # [P]
                tx = send[si, layer, phase] / bw[si]
                rx = recv[si, layer, phase] / bw[si]
                # link[i, j]: transfer time of j's data to i.
                link = self.latency_s + np.maximum(tx[None, :], rx[:, None])
                for on, a, b, factor in self._slow_links(steps[si : si + 1]):
                    if on[0]:
                        link[b, a] *= factor  # i = b waiting for j = a's data
                        link[a, b] *= factor
                link = (
                    link
                    * eta[si, layer, phase]
                    * _lognormal(rng, self.s.network.link_noise_cv, (P, P))
                    * self._spikes(rng, self.s.network.spike_prob, (P, P))
                )
                arrive = np.minimum(e[None, :] + link, exit_[si, layer, phase, 0])
                waits.append(np.maximum(arrive - e[:, None], 0.0))
                links.append(link)
                if phase == 0:  # bytes to each destination follow its routing share
                    sends.append(send[si, layer, 0][:, None] * q[si, layer][None, :])
                else:  # results go back to the sources evenly
                    sends.append(np.repeat(send[si, layer, 1][:, None] / P, P, axis=1))
                keys["rank"].append(np.arange(P))
                keys["step"].append(np.full(P, step))
                keys["layer"].append(np.full(P, layer))
                keys["phase"].append(np.full(P, phase))
        if not waits:
            return PeerRows.empty(P), np.empty((0, P))
        rows = PeerRows(
            rank=np.concatenate(keys["rank"]).astype("<i4"),
            step=np.concatenate(keys["step"]).astype("<i8"),
            layer=np.concatenate(keys["layer"]).astype("<i4"),
            phase=np.concatenate(keys["phase"]).astype("<u1"),
            wait_s=np.concatenate(waits).astype("<f8"),
            send_bytes=np.round(np.concatenate(sends)).astype("<i8"),
        )
        return rows, np.concatenate(links)

    # -- counter mode ----------------------------------------------------------------
    def _counter_waits(
        self,
        steps: np.ndarray,
        enter: np.ndarray,
        exit_: np.ndarray,
        send: np.ndarray,
        recv: np.ndarray,
        bw: np.ndarray,
        eta: np.ndarray,
        valid: np.ndarray,
    ) -> np.ndarray:
        """``[S, 2, P, P]``: per step and phase, summed over layers, how long rank i
        waited for rank j's data after entering (DeepEP's low-latency
        ``*_wait_recv_cost_stats``, one waiter per local expert, so times E / P).
        Collectives that never completed (a hang) add nothing: the kernel adds a wait
        only once the data has arrived. Per-link noise is drawn per chunk, layer and
        phase from a stream of its own, so the records mode is unchanged."""
        S, L, P = len(steps), self.L, self.P
        rng = np.random.default_rng([self.s.seed, int(steps[0]) // CHUNK_STEPS, 0xC0])
        waiters = self.E // P
        out = np.zeros((S, 2, P, P))
        slow = self._slow_links(steps)
        for layer in range(L):
            for phase in (0, 1):
                ok = valid[:, layer, phase].all(axis=1)  # [S]
                if not ok.any():
                    continue
                e = enter[:, layer, phase]  # [S, P]
                tx = send[:, layer, phase] / bw
                rx = recv[:, layer, phase] / bw
                link = self.latency_s + np.maximum(tx[:, None, :], rx[:, :, None])  # [S, i, j]
                for on, a, b, factor in slow:
                    link[on, b, a] *= factor
                    link[on, a, b] *= factor
                link *= eta[:, layer, phase][:, None, None]
                link *= _lognormal(rng, self.s.network.link_noise_cv, (P, P))
                arrive = np.minimum(e[:, None, :] + link, exit_[:, layer, phase, :1, None])
                wait = np.maximum(arrive - e[:, :, None], 0.0)
                out[ok, phase] += wait[ok] * waiters
        return out

    def _expert_tokens(self, n: np.ndarray, p_expert: np.ndarray) -> np.ndarray:
        """``[S, P, E / P]`` tokens each local expert received per step: each rank's
        routed slots (over layers) split over its experts by their routing shares."""
        S, P = n.shape[0], self.P
        share = p_expert.sum(axis=1).reshape(S, P, self.E // P)  # [S, P, E/P]
        share /= np.maximum(share.sum(axis=-1, keepdims=True), 1e-300)
        return np.round(n.sum(axis=1)[:, :, None] * share)

    # -- records -------------------------------------------------------------------
    def records(self, chunk: StepChunk, ranks: np.ndarray | None = None) -> RecordColumns:
        """The chunk as hook records on each rank's own clock (optionally some ranks)."""
        S, L, P = len(chunk.steps), self.L, self.P
        shape = (S, L, 2, P)
        mask = chunk.valid
        if ranks is not None:
            keep = np.zeros(P, dtype=bool)
            keep[ranks] = True
            mask = mask & keep
        flat = mask.ravel()
        rank = np.broadcast_to(np.arange(P), shape).ravel()[flat]
        offset = self.clock_offset_s[rank]

        def local_ns(t: np.ndarray) -> np.ndarray:
            return np.round((t.ravel()[flat] + offset) * 1e9).astype(np.int64)

        tokens = np.zeros(shape)
        tokens[:, :, 0] = chunk.recv_tokens
        return RecordColumns.from_arrays(
            rank=rank,
            local_device=self.local_device[rank],
            step=np.broadcast_to(chunk.steps[:, None, None, None], shape).ravel()[flat],
            layer=np.broadcast_to(np.arange(L)[None, :, None, None], shape).ravel()[flat],
            phase=np.broadcast_to(np.arange(2)[None, None, :, None], shape).ravel()[flat],
            enter_ns=local_ns(chunk.enter_s),
            exit_ns=local_ns(chunk.exit_s),
            send_bytes=np.round(chunk.send_bytes.ravel()[flat]),
            recv_bytes=np.round(chunk.recv_bytes.ravel()[flat]),
            recv_tokens=tokens.ravel()[flat],
        )

    def true_gamma(self, chunk: StepChunk) -> np.ndarray:
        """[S, L] straggler factor from the true compute times (for tests)."""
        x = chunk.compute_s
        return x.max(-1) / x.mean(-1)

    def workload(self) -> costmodel.Workload:
        m, w = self.s.model, self.s.workload
        return costmodel.Workload(
            batch_tokens=w.batch_tokens,
            ranks=self.P,
            topk=m.topk,
            hidden=m.hidden,
            bytes_per_elem=m.bytes_per_elem,
            layers=m.layers,
        )
