"""The collector's Prometheus surface (names and labels: docs/contracts.md).

Ingest health uses ordinary prometheus-client counters (the collector owns those
values). Everything the estimators compute is read from each group's newest typed report at
scrape time by :class:`GroupMetrics`, a custom collector, so straggler series appear
and disappear with the flags and a scrape never sees a half-updated group.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from epwatch.collector.estimators.report import GroupReport, PhaseReport
from epwatch.collector.groups import Group, finite

MAX_EVIDENCE = 4
PHASES = ("dispatch", "combine")

# Every reason the ingest path rejects a message for: the RecordError reasons of the
# decoder, schema and tables, plus "internal". Their counters exist at 0 from the
# start, so that rate() sees a first reject and the dashboards' reject panels have a
# series before anything goes wrong (tests/test_collector_ingest.py keeps this list
# complete).
REJECT_REASONS = (
    "bad_name",
    "bad_phase",
    "bad_sample",
    "bad_stats",
    "bad_world_size",
    "count_out_of_range",
    "duration_out_of_range",
    "garbage",
    "identity",
    "internal",
    "layer_out_of_range",
    "length_mismatch",
    "missing_agent_id",
    "missing_column",
    "missing_group",
    "missing_node",
    "missing_seq",
    "negative_count",
    "negative_duration",
    "negative_time",
    "non_finite",
    "over_budget",
    "oversized",
    "rank_out_of_range",
    "step_out_of_range",
    "too_large",
    "too_many_groups",
    "too_many_streams",
    "unauthenticated",
    "unsupported_payload",
    "unsupported_schema",
    "world_size_changed",
)

class IngestMetrics:
    """Counters the ingest path increments (once per message, never per record)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.records = Counter(
            "epwatch_ingest_records",
            "Hook records accepted",
            ["ep_group"],
            registry=registry,
        )
        self.intervals = Counter(
            "epwatch_ingest_intervals",
            "Counter-mode interval records accepted (decode under CUDA graphs)",
            ["ep_group"],
            registry=registry,
        )
        self.batches = Counter("epwatch_ingest_batches", "Messages accepted", registry=registry)
        self.duplicates = Counter(
            "epwatch_ingest_duplicates",
            "Messages already seen (not counted again)",
            registry=registry,
        )
        self.rejected = Counter(
            "epwatch_ingest_rejected", "Messages rejected, by reason", ["reason"], registry=registry
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.estimator_duration = Gauge(
            "epwatch_estimator_duration_seconds",
            "Wall time of the last estimator pass",
            registry=registry,
        )
        self.recorder_dropped = Counter(
            "epwatch_recorder_records_dropped",
            "Records the Parquet recorder could not keep up with",
            registry=registry,
        )
        self.members = (
            self.records,
            self.intervals,
            self.batches,
            self.duplicates,
            self.rejected,
            self.estimator_duration,
            self.recorder_dropped,
        )

    def forget_group(self, ep_group: str) -> None:
        """An expired group's counter goes with it (bounded label values over time)."""
        for counter in (self.records, self.intervals):
            with contextlib.suppress(KeyError):
                counter.remove(ep_group)


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


class _Quantiles(Metric):
    """Window quantiles of a per-(step, layer) ratio, typed ``summary`` because
    ``promtool check metrics`` refuses a ``quantile`` label on any other type. Only
    the quantile samples are exposed: the window has no meaningful _sum/_count."""

    def __init__(self, name: str, doc: str) -> None:
        super().__init__(name, doc, "summary")

    def add_metric(self, labels: list[str], value: float) -> None:
        group, quantile = labels
        self.add_sample(self.name, {"ep_group": group, "quantile": quantile}, value)


def family_names(collectors: Iterable[Any]) -> frozenset[str]:
    """Every metric and sample name the collectors' ``describe()`` announces: what the
    collector exposes itself, and node samples from agents may therefore not reuse."""
    names: set[str] = set()
    for collector in collectors:
        for family in collector.describe():
            names.add(family.name)
            names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ()))
    return frozenset(names)


_SUFFIXES = {"counter": ("_total", "_created"), "summary": ("_sum", "_count", "_created")}


class GroupMetrics(Collector):
    """Per-group estimator series, from each group's newest report."""

    def __init__(
        self, groups: Callable[[], list[Group]], stalled: Callable[[Group], float]
    ) -> None:
        self._groups = groups
        self._stalled = stalled

    def describe(self) -> Iterator[Metric]:
        yield from self._families().values()

    def collect(self) -> Iterator[Metric]:
        fams = self._families()
        for group in sorted(self._groups(), key=lambda x: x.ep_group):
            report = group.report or GroupReport(group.ep_group, group.world_size, 0, -1)
            _add_group(fams, group, report, self._stalled(group))
        yield from fams.values()

    @staticmethod
    def _families() -> dict[str, Metric]:
        g = ["ep_group"]
        return {
            "gamma": _Quantiles(
                "epwatch_straggler_factor_ratio",
                "Straggler factor: max over mean expert compute time, window quantile",
            ),
            "skew": _Quantiles(
                "epwatch_routing_skew_ratio",
                "Per-layer routed load max over mean, window quantile",
            ),
            "balancedness": _gauge(
                "epwatch_routing_balancedness_ratio", "1 / median routing skew", g
            ),
            "latency_s": _gauge(
                "epwatch_collective_latency_seconds", "Hockney fixed latency L", [*g, "phase"]
            ),
            "bandwidth_Bps": _gauge(
                "epwatch_collective_bandwidth_bytes_per_second",
                "Hockney effective bandwidth BW_eff",
                [*g, "phase"],
            ),
            "r2": _gauge(
                "epwatch_collective_fit_r2_ratio", "R^2 of the Hockney fit", [*g, "phase"]
            ),
            "n": _gauge(
                "epwatch_collective_fit_points", "Points in the Hockney fit", [*g, "phase"]
            ),
            "crossover_bytes": _gauge(
                "epwatch_collective_crossover_bytes", "Crossover n_1/2 = L * BW_eff", [*g, "phase"]
            ),
            "per_peer_message_bytes": _gauge(
                "epwatch_collective_per_peer_message_bytes",
                "Median per-peer message V / (P-1)",
                [*g, "phase"],
            ),
            "latency_bound": _gauge(
                "epwatch_collective_latency_bound",
                "1 when the per-peer message is below the crossover",
                [*g, "phase"],
            ),
            "transfer_s": _gauge(
                "epwatch_collective_transfer_seconds",
                "Median transfer time min_r d_r",
                [*g, "phase"],
            ),
            "lost": _gauge(
                "epwatch_straggler_seconds_per_step",
                "Time lost per forward pass to stragglers",
                g,
            ),
            "compute_slowdown": _gauge(
                "epwatch_rank_compute_slowdown_ratio",
                "Per-token compute cost over the group median",
                [*g, "rank", "node"],
            ),
            "load_ratio": _gauge(
                "epwatch_rank_load_ratio", "Routed load over the mean load", [*g, "rank", "node"]
            ),
            "arrival_lag_s": _gauge(
                "epwatch_rank_arrival_lag_seconds", "Median arrival lag", [*g, "rank", "node"]
            ),
            "batch_ratio": _gauge(
                "epwatch_rank_batch_ratio",
                "A rank's own (data-parallel) batch over the group median",
                [*g, "rank", "node"],
            ),
            "straggler": _gauge(
                "epwatch_straggler",
                "Present while the rank is flagged slow; value = slowdown",
                [*g, "rank", "node", "cause"],
            ),
            "stalled_rank": _gauge(
                "epwatch_rank_stalled_seconds",
                "Present while the rank is pinned as hung (never entered the collective "
                "its peers wait in); value = seconds the group has made no progress",
                [*g, "rank", "node"],
            ),
            "dropped": CounterMetricFamily(
                "epwatch_dropped_tokens",
                "Routed token-expert slots for the rank's experts that a capacity limit "
                "dropped (GShard/Switch layers), in analysed steps",
                labels=[*g, "rank"],
            ),
            "first_step": _gauge(
                "epwatch_straggler_first_step",
                "First step the flag's evidence held",
                [*g, "rank", "node", "cause"],
            ),
            "evidence": _gauge(
                "epwatch_straggler_evidence",
                "1 per evidence line of a flagged rank",
                [*g, "rank", "node", "cause", "evidence"],
            ),
            "steps": CounterMetricFamily(
                "epwatch_group_steps", "Steps finalised by the estimators", labels=g
            ),
            "last_step": _gauge("epwatch_group_last_step", "Newest finalised step", g),
            "world_size": _gauge("epwatch_group_world_size", "P", g),
            "mode": _gauge(
                "epwatch_group_mode",
                "1 for what feeds the group's diagnosis: records (per collective), counters "
                "(kernel counters under CUDA graphs) or mixed",
                [*g, "mode"],
            ),
            "stalled": _gauge(
                "epwatch_group_stalled_seconds",
                "Seconds since the group last completed a collective (0 when moving)",
                g,
            ),
            "late_records": CounterMetricFamily(
                "epwatch_group_late_records",
                "Records for steps already analysed or far behind (dropped)",
                labels=g,
            ),
            "incomplete_steps": CounterMetricFamily(
                "epwatch_group_incomplete_steps",
                "Steps dropped because some rank's records never arrived",
                labels=g,
            ),
            "ignored_records": CounterMetricFamily(
                "epwatch_group_ignored_records",
                "Records of layers beyond the estimators' max_layers",
                labels=g,
            ),
            "restarts": CounterMetricFamily(
                "epwatch_group_restarts",
                "Times the group's engine restarted its step count (a new run)",
                labels=g,
            ),
            "suspect_link": _gauge(
                "epwatch_suspect_link_slowdown_ratio",
                "A link slower than both its ends predict (top 5 per group): src's data to dst",
                [*g, "src_rank", "dst_rank"],
            ),
            "batch_scale": _gauge(
                "epwatch_whatif_batch_scale_ratio",
                "How many times larger the batch must be for per-peer messages to reach "
                "the crossover (above 1: latency-bound)",
                g,
            ),
            "covers": _gauge(
                "epwatch_whatif_overlap_covers_comm",
                "1 when a layer's expert compute covers its dispatch + combine "
                "(dual-batch overlap can hide the all-to-alls)",
                g,
            ),
        }


def _add(fam: Any, labels: list[str], value: Any) -> None:
    v = finite(value)
    if v is not None:
        fam.add_metric(labels, v)


def _add_group(fams: dict[str, Any], group: Group, rep: GroupReport, stalled: float) -> None:
    name = group.ep_group
    _add(fams["gamma"], [name, "0.5"], rep.gamma_median)
    _add(fams["gamma"], [name, "0.99"], rep.gamma_p99)
    _add(fams["skew"], [name, "0.5"], rep.skew_median)
    _add(fams["skew"], [name, "1"], rep.skew_max)
    _add(fams["balancedness"], [name], rep.balancedness)
    for phase in PHASES:
        fit = rep.phases.get(phase, PhaseReport())
        for key in _PHASE_GAUGES:
            _add(fams[key], [name, phase], getattr(fit, key))
        if fit.n:
            _add(fams["n"], [name, phase], fit.n)
        if fit.regime in ("latency-bound", "bandwidth-bound"):
            fams["latency_bound"].add_metric(
                [name, phase], 1.0 if fit.regime == "latency-bound" else 0.0
            )
    _add(fams["lost"], [name], rep.time_lost_per_step_s)
    for key in ("compute_slowdown", "load_ratio", "arrival_lag_s", "batch_ratio"):
        for rank, value in enumerate(getattr(rep, key)):
            node = rep.nodes[rank] if rank < len(rep.nodes) else ""
            _add(fams[key], [name, str(rank), node], value)
    seen: set[tuple[str, str, str]] = set()
    for s in rep.stragglers:
        key = (str(s.rank), s.node, s.cause)
        if not s.active or key in seen:
            continue
        seen.add(key)
        if s.cause == "hang":  # seconds stalled, not a slowdown: a metric of its own
            fams["stalled_rank"].add_metric([name, *key[:2]], max(stalled, 0.0))
        else:
            slowdown = finite(s.slowdown)
            fams["straggler"].add_metric([name, *key], 1.0 if slowdown is None else slowdown)
        _add(fams["first_step"], [name, *key], s.first_step)
        lines = dict.fromkeys(evidence_label(x) for x in s.evidence)
        for line in list(lines)[:MAX_EVIDENCE]:
            fams["evidence"].add_metric([name, *key, line], 1.0)
    for rank, total in enumerate(rep.dropped_tokens_total):
        if total:
            fams["dropped"].add_metric([name, str(rank)], float(total))
    _add(fams["steps"], [name], rep.steps)
    if rep.last_step >= 0:
        _add(fams["last_step"], [name], rep.last_step)
    fams["world_size"].add_metric([name], float(group.world_size))
    fams["mode"].add_metric([name, rep.mode], 1.0)
    fams["stalled"].add_metric([name], stalled)
    for key in ("late_records", "incomplete_steps", "ignored_records", "restarts"):
        _add(fams[key], [name], getattr(rep, key))
    for link in rep.suspect_links:
        if link.active:
            _add(fams["suspect_link"], [name, str(link.src), str(link.dst)], link.slowdown)
    whatif = rep.whatif
    _add(fams["batch_scale"], [name], whatif.get("batch_scale_for_bandwidth_bound"))
    if "overlap_covers_comm" in whatif:
        fams["covers"].add_metric([name], 1.0 if whatif["overlap_covers_comm"] else 0.0)


_PHASE_GAUGES = (
    "latency_s",
    "bandwidth_Bps",
    "r2",
    "crossover_bytes",
    "per_peer_message_bytes",
    "transfer_s",
)

_SPAN = re.compile(r" (?:for|in) [\d.]+ ?(?:s|min|h|d)\b")
_NUMBER = re.compile(r"(?<![\w.])\d{3,}(?:\.\d+)?(?![\w.])")


def evidence_label(line: str) -> str:
    """An evidence line as a label value that does not churn from scrape to scrape:
    no "for 40 s" spans, numbers of three or more digits to two significant ones
    (the JSON diagnosis keeps the exact text)."""
    line = _SPAN.sub("", line)
    return _NUMBER.sub(lambda m: _two_significant(float(m.group())), line)


def _two_significant(x: float) -> str:
    digits = len(str(int(x)))
    return str(int(round(x, 2 - digits)))
