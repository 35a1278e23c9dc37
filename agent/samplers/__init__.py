"""Node samplers of the agent: GPU (NVML, amdsmi/rocm-smi) and NIC (netdev, InfiniBand).

One sampler per module, one small interface (:class:`~agent.samplers.base.Sampler`),
each switched by ``--sampler.<name>``; :mod:`agent.samplers.registry` is the entry
point for the agent's CLI and daemon. Imports no GPU library until a sampler runs.
"""

from agent.samplers.base import (
    METRICS,
    Kind,
    Point,
    RoundRunner,
    Sampler,
    SamplerResult,
    SamplerUnavailable,
    collect_round,
    metric,
    run_sampler,
)

__all__ = [
    "METRICS",
    "Kind",
    "Point",
    "RoundRunner",
    "Sampler",
    "SamplerResult",
    "SamplerUnavailable",
    "collect_round",
    "metric",
    "run_sampler",
]
