"""The samplers an agent can run: flags, construction, and one-shot sampling.

``epwatch agent`` calls :func:`add_sampler_arguments` on its parser, then
:func:`build_samplers` with the parsed options and runs them each interval with
:func:`~epwatch.agent.samplers.runner.make_sample_round`; ``epwatch agent
--sample-once --json`` prints :func:`sample_once`. Every sampler has
``--sampler.<name>`` / ``--no-sampler.<name>``, as in node_exporter.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from epwatch.agent.samplers.amd import AmdSampler
from epwatch.agent.samplers.base import Sampler
from epwatch.agent.samplers.gpumap import LocalRankMap, parse_local_ranks
from epwatch.agent.samplers.infiniband import InfinibandSampler
from epwatch.agent.samplers.netdev import DEFAULT_EXCLUDE, NetdevSampler
from epwatch.agent.samplers.nvidia import NvidiaSampler
from epwatch.agent.samplers.runner import collect_round


@dataclass(frozen=True)
class SamplerSpec:
    """One catalogue entry: its flag name, help, default and how to build it."""

    name: str
    help: str
    default_enabled: bool
    factory: Callable[[_Options], Sampler]


class _Options:
    """Reads parsed options with defaults, so a caller's namespace may omit any of them."""

    def __init__(self, options: argparse.Namespace | Mapping[str, Any] | None) -> None:
        if options is None:
            self._data: dict[str, Any] = {}
        elif isinstance(options, Mapping):
            self._data = dict(options)
        else:
            self._data = vars(options)

    def get(self, key: str, default: Any = None) -> Any:
        value = self._data.get(key)
        return default if value is None else value

    @property
    def sysfs_root(self) -> str:
        return str(self.get("sysfs_root", "/sys"))

    @property
    def local_ranks(self) -> LocalRankMap:
        spec = self.get("gpu_local_ranks")
        return spec if isinstance(spec, LocalRankMap) else parse_local_ranks(spec)


SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec(
            "nvidia",
            "NVIDIA GPUs through NVML (nvidia-ml-py)",
            True,
            lambda o: NvidiaSampler(local_ranks=o.local_ranks),
        ),
        SamplerSpec(
            "amd",
            "AMD GPUs through amdsmi, else rocm-smi --json",
            True,
            lambda o: AmdSampler(local_ranks=o.local_ranks),
        ),
        SamplerSpec(
            "netdev",
            "network interfaces from <sysfs>/class/net",
            True,
            lambda o: NetdevSampler(
                o.sysfs_root, device_exclude=o.get("netdev_device_exclude", DEFAULT_EXCLUDE)
            ),
        ),
        SamplerSpec(
            "infiniband",
            "InfiniBand/RoCE HCAs from <sysfs>/class/infiniband",
            True,
            lambda o: InfinibandSampler(o.sysfs_root),
        ),
    )
}


def _dest(name: str) -> str:
    return f"sampler_{name}"


def _local_ranks_arg(text: str) -> LocalRankMap:
    try:
        return parse_local_ranks(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_sampler_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the sampler flags to ``parser`` (an argument group of its own)."""
    group = parser.add_argument_group("node samplers")
    for spec in SAMPLERS.values():
        group.add_argument(
            f"--sampler.{spec.name}",
            dest=_dest(spec.name),
            action=argparse.BooleanOptionalAction,
            default=spec.default_enabled,
            help=f"{spec.help} (default: {'on' if spec.default_enabled else 'off'})",
        )
    group.add_argument(
        "--sysfs-root",
        default="/sys",
        metavar="PATH",
        help="sysfs mount point the network samplers read (like node_exporter's --path.sysfs)",
    )
    group.add_argument(
        "--gpu-local-ranks",
        type=_local_ranks_arg,
        default=LocalRankMap(),
        metavar="LIST",
        help="GPUs in local-rank order, as in CUDA_VISIBLE_DEVICES (indices or UUIDs); "
        "'env' reads CUDA/HIP/ROCR_VISIBLE_DEVICES; default: GPU index = local rank",
    )
    group.add_argument(
        "--netdev.device-exclude",
        dest="netdev_device_exclude",
        default=DEFAULT_EXCLUDE,
        metavar="REGEX",
        help=f"interfaces the netdev sampler skips (default: {DEFAULT_EXCLUDE})",
    )


def enabled_sampler_names(options: argparse.Namespace | Mapping[str, Any] | None) -> list[str]:
    opts = _Options(options)
    return [s.name for s in SAMPLERS.values() if bool(opts.get(_dest(s.name), s.default_enabled))]


def build_samplers(options: argparse.Namespace | Mapping[str, Any] | None = None) -> list[Sampler]:
    """The enabled samplers, built from parsed options (a namespace or a dict)."""
    opts = _Options(options)
    return [SAMPLERS[name].factory(opts) for name in enabled_sampler_names(options)]


def sample_once(samplers: Iterable[Sampler], timeout_s: float | None = 30.0) -> dict[str, Any]:
    """One round of every sampler as a JSON-ready dict (``--sample-once --json``)."""
    samplers = list(samplers)
    now_ns = time.time_ns()
    _, results = collect_round(samplers, timeout_s=timeout_s)
    return {
        "time_unix_ns": now_ns,
        "samplers": [
            {
                "name": r.name,
                "ok": r.ok,
                "duration_s": round(r.duration_s, 6),
                "error": r.error,
                "skipped": r.skipped,
                "points": [p.to_dict() for p in r.points],
            }
            for r in results
        ],
    }


__all__ = [
    "SAMPLERS",
    "SamplerSpec",
    "add_sampler_arguments",
    "build_samplers",
    "enabled_sampler_names",
    "sample_once",
]
