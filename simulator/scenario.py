"""Scenario files (TOML) for the cluster simulator, validated key by key.

A scenario names the cluster, the model, the workload, the network and compute cost
and the faults to inject. Unknown keys and out-of-range values are errors that name
the key, because a typo in a fault silently simulating a clean cluster would make a
test or a demo lie.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

FAULT_KINDS = ("slow_gpu", "slow_nic", "hot_expert", "hang", "slow_link", "batch_imbalance")
ROUTINGS = ("uniform", "zipf")


class ScenarioError(ValueError):
    """A scenario that cannot be simulated; the message names the key."""


@dataclass(frozen=True)
class Cluster:
    ranks: int = 16
    ranks_per_node: int = 8
    ep_group: str = "ep0"


@dataclass(frozen=True)
class Model:
    layers: int = 61
    experts: int = 256
    topk: int = 8
    hidden: int = 7168
    bytes_per_elem: float = 1.0


@dataclass(frozen=True)
class WorkloadSpec:
    batch_tokens: int = 16384
    batch_jitter: float = 0.3  # the global batch of a step varies: shared by every rank
    rank_batch_jitter: float = 0.05  # each rank's own (data-parallel) batch around B / P
    routing: str = "uniform"
    zipf_s: float = 1.0  # 0 is uniform popularity


@dataclass(frozen=True)
class Network:
    latency_us: float = 80.0
    bandwidth_gbps: float = 40.0
    noise_cv: float = 0.05  # per collective, shared by every link
    link_noise_cv: float = 0.01  # per link, in the sampled per-peer waits
    spike_prob: float = 0.0  # a collective (all links) 2-5x slower: congestion bursts


@dataclass(frozen=True)
class Compute:
    """Expert compute per routed slot, and the noise real clusters add to it.

    ``noise_cv`` is independent per (step, layer, rank); ``shared_cv`` one factor per
    step for every rank (batch composition, cluster-wide clocks); ``drift_cv`` a slow
    per-rank wander over about ``drift_steps`` steps (GPUs are not identical and warm
    up); ``spike_prob`` a 2-5x kernel spike per (step, layer, rank) and
    ``rank_spike_prob`` a whole step of one rank 2-5x slower (host preemption, GC).
    """

    ns_per_token: float = 40.0
    noise_cv: float = 0.05
    shared_cv: float = 0.0
    drift_cv: float = 0.0
    drift_steps: int = 300
    spike_prob: float = 0.0
    rank_spike_prob: float = 0.0
    spike_min: float = 2.0
    spike_max: float = 5.0


@dataclass(frozen=True)
class Attention:
    """The work between a layer's combine and the next dispatch (DP attention): a fixed
    part plus a cost per token of the rank's own batch; a slow GPU slows it too."""

    fixed_us: float = 20.0
    ns_per_token: float = 100.0
    noise_cv: float = 0.05


PROBE_MODES = ("records", "counters")


@dataclass(frozen=True)
class Probe:
    peer_sample_every: int = 10
    # "records": per-collective hook records (eager); "counters": only the kernels'
    # cumulative counters, read every counter_interval_steps (decode under CUDA graphs).
    mode: str = "records"
    counter_interval_steps: int = 5


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int = 0
    start_step: int = 0
    factor: float = 1.0
    expert: int = 0
    share: float = 0.0
    layer: int = 0  # hang: the layer whose dispatch the rank never enters
    peer: int = 0  # slow_link: the other end of the link (both directions are slow)


@dataclass(frozen=True)
class Scenario:
    seed: int = 1
    steps: int = 400
    cluster: Cluster = field(default_factory=Cluster)
    model: Model = field(default_factory=Model)
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    network: Network = field(default_factory=Network)
    compute: Compute = field(default_factory=Compute)
    attention: Attention = field(default_factory=Attention)
    probe: Probe = field(default_factory=Probe)
    faults: tuple[Fault, ...] = ()

    def node_of(self, rank: int) -> str:
        return f"node-{rank // self.cluster.ranks_per_node}"

    @property
    def nodes(self) -> list[str]:
        per = self.cluster.ranks_per_node
        return [f"node-{i}" for i in range((self.cluster.ranks + per - 1) // per)]



_SECTIONS = {
    "cluster": Cluster,
    "model": Model,
    "workload": WorkloadSpec,
    "network": Network,
    "compute": Compute,
    "attention": Attention,
    "probe": Probe,
}


def _build(cls: type, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise ScenarioError(f"[{where}] must be a table")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in known:
            raise ScenarioError(
                f"[{where}] unknown key {key!r} (known: {', '.join(sorted(known))})"
            )
        default_type = type(getattr(cls, key, None)) if hasattr(cls, key) else None
        want = known[key].type
        if want in ("int", int) or default_type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ScenarioError(f"[{where}] {key} must be an integer, got {value!r}")
        elif want in ("float", float) or default_type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ScenarioError(f"[{where}] {key} must be a number, got {value!r}")
            value = float(value)
        elif (want in ("str", str) or default_type is str) and not isinstance(value, str):
            raise ScenarioError(f"[{where}] {key} must be a string, got {value!r}")
        values[key] = value
    try:
        return cls(**values)
    except TypeError as err:  # a required key is missing
        raise ScenarioError(f"[{where}] {err}") from None


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ScenarioError(message)


def _validate(s: Scenario) -> None:
    c, m, w, n, k, p = s.cluster, s.model, s.workload, s.network, s.compute, s.probe
    a = s.attention
    _check(s.steps >= 1, f"steps must be >= 1, got {s.steps}")
    _check(c.ranks >= 2, f"[cluster] ranks must be >= 2, got {c.ranks}")
    _check(c.ranks_per_node >= 1, f"[cluster] ranks_per_node must be >= 1, got {c.ranks_per_node}")
    _check(bool(c.ep_group), "[cluster] ep_group must not be empty")
    _check(m.layers >= 1, f"[model] layers must be >= 1, got {m.layers}")
    _check(
        m.experts >= c.ranks and m.experts % c.ranks == 0,
        f"[model] experts ({m.experts}) must be a multiple of [cluster] ranks ({c.ranks}): "
        "experts are placed contiguously, experts/ranks per rank",
    )
    _check(1 <= m.topk <= m.experts, f"[model] topk must be in [1, experts], got {m.topk}")
    _check(m.hidden >= 1, f"[model] hidden must be >= 1, got {m.hidden}")
    _check(m.bytes_per_elem > 0, f"[model] bytes_per_elem must be > 0, got {m.bytes_per_elem}")
    _check(
        w.batch_tokens >= c.ranks,
        f"[workload] batch_tokens must be >= ranks ({c.ranks}), got {w.batch_tokens}",
    )
    _check(
        0 <= w.batch_jitter < 1, f"[workload] batch_jitter must be in [0, 1), got {w.batch_jitter}"
    )
    _check(
        w.routing in ROUTINGS, f"[workload] routing must be one of {ROUTINGS}, got {w.routing!r}"
    )
    _check(
        0 <= w.rank_batch_jitter < 1,
        f"[workload] rank_batch_jitter must be in [0, 1), got {w.rank_batch_jitter}",
    )
    _check(w.zipf_s >= 0, f"[workload] zipf_s must be >= 0 (0 = uniform), got {w.zipf_s}")
    _check(n.latency_us >= 0, f"[network] latency_us must be >= 0, got {n.latency_us}")
    _check(n.bandwidth_gbps > 0, f"[network] bandwidth_gbps must be > 0, got {n.bandwidth_gbps}")
    _check(0 <= n.noise_cv < 1, f"[network] noise_cv must be in [0, 1), got {n.noise_cv}")
    _check(k.ns_per_token > 0, f"[compute] ns_per_token must be > 0, got {k.ns_per_token}")
    for where, obj, names in (
        ("network", n, ("link_noise_cv", "spike_prob")),
        ("compute", k, ("noise_cv", "shared_cv", "drift_cv", "spike_prob", "rank_spike_prob")),
        ("attention", a, ("noise_cv",)),
    ):
        for name in names:
            v = getattr(obj, name)
            _check(0 <= v < 1, f"[{where}] {name} must be in [0, 1), got {v}")
    _check(k.drift_steps >= 1, f"[compute] drift_steps must be >= 1, got {k.drift_steps}")
    _check(
        1 <= k.spike_min <= k.spike_max,
        f"[compute] need 1 <= spike_min <= spike_max, got {k.spike_min}, {k.spike_max}",
    )
    _check(a.fixed_us >= 0, f"[attention] fixed_us must be >= 0, got {a.fixed_us}")
    _check(a.ns_per_token >= 0, f"[attention] ns_per_token must be >= 0, got {a.ns_per_token}")
    _check(
        p.peer_sample_every >= 1,
        f"[probe] peer_sample_every must be >= 1, got {p.peer_sample_every}",
    )
    _check(p.mode in PROBE_MODES, f"[probe] mode must be one of {PROBE_MODES}, got {p.mode!r}")
    _check(
        p.counter_interval_steps >= 1,
        f"[probe] counter_interval_steps must be >= 1, got {p.counter_interval_steps}",
    )
    for i, f in enumerate(s.faults):
        where = f"[[faults]] #{i + 1} ({f.kind})"
        _check(
            f.kind in FAULT_KINDS,
            f"[[faults]] #{i + 1} kind must be one of {FAULT_KINDS}, got {f.kind!r}",
        )
        _check(
            0 <= f.start_step < s.steps,
            f"{where} start_step must be in [0, steps), got {f.start_step}",
        )
        if f.kind in ("slow_gpu", "slow_nic", "hang", "slow_link", "batch_imbalance"):
            _check(0 <= f.rank < c.ranks, f"{where} rank must be in [0, {c.ranks}), got {f.rank}")
        if f.kind == "slow_link":
            _check(
                0 <= f.peer < c.ranks and f.peer != f.rank,
                f"{where} peer must be another rank in [0, {c.ranks}), got {f.peer}",
            )
        if f.kind in ("slow_gpu", "slow_nic", "slow_link", "batch_imbalance"):
            _check(f.factor >= 1.0, f"{where} factor must be >= 1, got {f.factor}")
        if f.kind == "hot_expert":
            _check(
                0 <= f.expert < m.experts,
                f"{where} expert must be in [0, {m.experts}), got {f.expert}",
            )
            _check(0 < f.share < 1, f"{where} share must be in (0, 1), got {f.share}")
        if f.kind == "hang":
            _check(
                0 <= f.layer < m.layers, f"{where} layer must be in [0, {m.layers}), got {f.layer}"
            )
    _check(sum(f.kind == "hang" for f in s.faults) <= 1, "[[faults]] at most one hang per scenario")


def scenario_from_dict(data: dict[str, Any]) -> Scenario:
    """Build and validate a scenario from parsed TOML (or an equivalent dict)."""
    top_known = {"seed", "steps", "faults", *_SECTIONS}
    for key in data:
        if key not in top_known:
            raise ScenarioError(f"unknown key {key!r} (known: {', '.join(sorted(top_known))})")
    kwargs: dict[str, Any] = {}
    for key in ("seed", "steps"):
        if key in data:
            if isinstance(data[key], bool) or not isinstance(data[key], int):
                raise ScenarioError(f"{key} must be an integer, got {data[key]!r}")
            kwargs[key] = data[key]
    for name, cls in _SECTIONS.items():
        if name in data:
            kwargs[name] = _build(cls, data[name], name)
    faults = data.get("faults", [])
    if not isinstance(faults, list):
        raise ScenarioError("faults must be an array of tables: [[faults]]")
    kwargs["faults"] = tuple(_build(Fault, f, f"[faults] #{i + 1}") for i, f in enumerate(faults))
    scenario = Scenario(**kwargs)
    _validate(scenario)
    return scenario


def load_scenario(source: str | Path | dict[str, Any]) -> Scenario:
    """Load a scenario from a TOML file path or a dict."""
    if isinstance(source, dict):
        return scenario_from_dict(source)
    path = Path(source)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise ScenarioError(f"cannot read {path}: {err.strerror or err}") from None
    except tomllib.TOMLDecodeError as err:
        raise ScenarioError(f"{path}: not valid TOML: {err}") from None
    try:
        return scenario_from_dict(data)
    except ScenarioError as err:
        raise ScenarioError(f"{path}: {err}") from None
