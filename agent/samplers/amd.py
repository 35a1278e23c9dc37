"""AMD Instinct GPUs through ``amdsmi``, with a ``rocm-smi --json`` fallback.

``import amdsmi`` is fragile: without ``libamd_smi.so`` it raises KeyError (it looks up
ROCM_PATH) or OSError rather than ImportError, so the import is guarded broadly. When
amdsmi cannot be used the sampler runs ``rocm-smi --json`` whose values are strings
with the unit inside ("(1700Mhz)", "35.0c", "266.0 W", "42%"); :func:`parse_quantity`
turns them into base units. The same ``epwatch_gpu_*`` names as NVIDIA are emitted.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

from epwatch.agent.samplers.base import Sampler, SamplerUnavailable
from epwatch.agent.samplers.gpumap import LocalRankMap
from epwatch.catalogue import Point, metric

ROCM_SMI_ARGS = (
    "--showtemp",
    "--showpower",
    "--showuse",
    "--showmeminfo",
    "vram",
    "--showclocks",
    "--showenergycounter",
    "--json",
)

_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_UNIT_SCALE = {
    "": 1.0,
    "hz": 1.0,
    "khz": 1e3,
    "mhz": 1e6,
    "ghz": 1e9,
    "c": 1.0,
    "w": 1.0,
    "mw": 1e-3,
    "uw": 1e-6,
    "%": 0.01,
    "b": 1.0,
    "kb": 1024.0,
    "mb": 1024.0**2,
    "gb": 1024.0**3,
    "j": 1.0,
    "mj": 1e-3,
    "uj": 1e-6,
}


def parse_quantity(value: Any, unit: str | None = None) -> float | None:
    """A rocm-smi value in base units: ``"(1700Mhz)"`` -> 1.7e9, ``"35.0c"`` -> 35.0.

    ``unit`` is the unit named in the key (``"W"`` in "... Power (W)") and is used
    when the value itself carries none. Percentages become ratios. "N/A" -> None.
    """
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        number, suffix = float(value), ""
    else:
        text = str(value).strip().strip("()[] ")
        match = _NUMBER.search(text)
        if match is None:
            return None
        number = float(match.group(0))
        suffix = text[match.end() :].strip().strip("()[] ").lower()
    suffix = suffix or (unit or "").lower()
    scale = _UNIT_SCALE.get(suffix)
    if scale is None:
        return None  # a unit we do not know: better no series than a wrong one
    return number * scale


_KEY_UNIT = re.compile(r"\(([^()]*)\)\s*:?\s*$")


def _key_unit(key: str) -> str:
    match = _KEY_UNIT.search(key)
    return match.group(1) if match else ""


# rocm-smi JSON key candidates (newest first) -> metric
_ROCM_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "epwatch_gpu_temperature_celsius",
        ("Temperature (Sensor junction) (C)", "Temperature (Sensor edge) (C)", "Temperature"),
    ),
    (
        "epwatch_gpu_power_watts",
        (
            "Current Socket Graphics Package Power (W)",
            "Average Graphics Package Power (W)",
            "Average Graphics Package Power",
        ),
    ),
    ("epwatch_gpu_utilization_ratio", ("GPU use (%)",)),
    ("epwatch_gpu_memory_used_bytes", ("VRAM Total Used Memory (B)",)),
    ("epwatch_gpu_sm_clock_hertz", ("sclk clock speed:",)),
    ("epwatch_gpu_energy_joules_total", ("Accumulated Energy (uJ)",)),
    ("epwatch_gpu_pcie_replays_total", ("PCIe Replay Count",)),
)
_CARD = re.compile(r"^card(\d+)$")


def parse_rocm_smi(
    data: Mapping[str, Any], local_ranks: LocalRankMap | None = None
) -> tuple[list[Point], list[str]]:
    """Points from ``rocm-smi --json`` output, plus notes on values that did not parse."""
    local_ranks = local_ranks or LocalRankMap()
    points: list[Point] = []
    notes: list[str] = []
    for card, fields in sorted(data.items(), key=lambda kv: _card_index(kv[0])):
        match = _CARD.match(card)
        if match is None or not isinstance(fields, Mapping):
            continue  # "system" and friends
        gpu = match.group(1)
        for name, keys in _ROCM_KEYS:
            for key in keys:
                if key not in fields:
                    continue
                value = parse_quantity(fields[key], _key_unit(key))
                if value is None:
                    if str(fields[key]).strip().upper() not in ("N/A", ""):
                        notes.append(f"{card} {key!r}: cannot parse {fields[key]!r}")
                    continue
                points.append(metric(name, value, gpu=gpu))
                break
        rank = local_ranks.local_rank(int(gpu), None)
        if rank is not None:
            points.append(metric("epwatch_gpu_local_rank", rank, gpu=gpu))
    return points, notes


def _card_index(key: str) -> int:
    match = _CARD.match(key)
    return int(match.group(1)) if match else 1 << 30


def _run_rocm_smi(path: str, timeout_s: float) -> str:
    proc = subprocess.run(
        [path, *ROCM_SMI_ARGS], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    # rocm-smi exits non-zero when one query is unsupported yet still prints JSON
    if not proc.stdout.strip():
        raise RuntimeError(f"rocm-smi exited {proc.returncode}: {proc.stderr.strip()[:200]}")
    return proc.stdout


def _import_amdsmi() -> Any:
    import amdsmi

    return amdsmi


class AmdSampler(Sampler):
    """All AMD GPUs of the node; ``gpu`` is the amdsmi handle order (card index for rocm-smi)."""

    name = "amd"

    def __init__(
        self,
        amdsmi: Any | None = None,
        rocm_smi: Callable[[], str] | None = None,
        local_ranks: LocalRankMap | None = None,
        use_amdsmi: bool = True,
        rocm_smi_path: str | None = None,
        retry_init_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 10.0,
    ) -> None:
        super().__init__()
        self._given_amdsmi = amdsmi
        self._given_rocm_smi = rocm_smi
        self.use_amdsmi = use_amdsmi
        self.rocm_smi_path = rocm_smi_path
        self.local_ranks = local_ranks or LocalRankMap()
        self.retry_init_s = retry_init_s
        self.clock = clock
        self.timeout_s = timeout_s
        self.backend: str | None = None
        self.lib: Any = None
        self._rocm: Callable[[], str] | None = None
        self._handles: list[Any] = []
        self._unavailable: str | None = None
        self._retry_at = 0.0

    def _ensure_init(self) -> None:
        if self.backend is not None:
            return
        if self._unavailable is not None and self.clock() < self._retry_at:
            raise SamplerUnavailable(self._unavailable)
        reasons = []
        if self.use_amdsmi:
            try:
                lib = self._given_amdsmi if self._given_amdsmi is not None else _import_amdsmi()
                lib.amdsmi_init()
                self._handles = list(lib.amdsmi_get_processor_handles())
            except Exception as exc:  # KeyError/OSError/ImportError/AmdSmiLibraryException
                reasons.append(f"amdsmi: {type(exc).__name__}: {exc}")
            else:
                self.lib, self.backend = lib, "amdsmi"
                return
        if self._given_rocm_smi is not None:
            self._rocm, self.backend = self._given_rocm_smi, "rocm-smi"
            return
        path = self.rocm_smi_path or shutil.which("rocm-smi")
        if path:
            self._rocm = lambda: _run_rocm_smi(path, self.timeout_s)
            self.backend = "rocm-smi"
            return
        reasons.append("rocm-smi not found on PATH")
        self._unavailable = "AMD SMI unavailable: " + "; ".join(reasons)
        self._retry_at = self.clock() + self.retry_init_s
        raise SamplerUnavailable(self._unavailable)

    def close(self) -> None:
        if self.backend == "amdsmi":
            with contextlib.suppress(Exception):
                self.lib.amdsmi_shut_down()
        self.backend = None

    def collect(self) -> list[Point]:
        self._ensure_init()
        if self.backend == "rocm-smi":
            assert self._rocm is not None
            text = self._rocm()
            try:
                data = json.loads(text)
            except ValueError as exc:
                raise RuntimeError(f"rocm-smi printed no JSON: {text[:120]!r}") from exc
            points, notes = parse_rocm_smi(data, self.local_ranks)
            for note in notes:
                self.skip("rocm-smi", note)
            return points
        points: list[Point] = []
        for index, handle in enumerate(self._handles):
            points.extend(self._gpu(str(index), handle))
            rank = self.local_ranks.local_rank(index, None)
            if rank is not None:
                points.append(metric("epwatch_gpu_local_rank", rank, gpu=str(index)))
        return points

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # AmdSmiLibraryException (NOT_SUPPORTED...) and the like
            self.skip(what, exc)
            return None

    def _gpu(self, gpu: str, h: Any) -> list[Point]:
        lib = self.lib
        out: list[Point] = []

        def add(name: str, value: Any, scale: float = 1.0, **labels: str) -> None:
            number = _number(value)
            if number is not None:
                out.append(metric(name, number * scale, gpu=gpu, **labels))

        clk_type = getattr(lib.AmdSmiClkType, "GFX", None)
        if clk_type is None:  # GFX is 0, an alias of SYS: test for None, not truth
            clk_type = lib.AmdSmiClkType.SYS
        clock = self._call(f"gpu {gpu} clock", lambda: lib.amdsmi_get_clock_info(h, clk_type))
        if isinstance(clock, Mapping):
            add("epwatch_gpu_sm_clock_hertz", _first(clock, "clk", "cur_clk"), 1e6)  # MHz
        power = self._call(f"gpu {gpu} power", lambda: lib.amdsmi_get_power_info(h))
        if isinstance(power, Mapping):
            watts = _first(power, "socket_power", "current_socket_power", "average_socket_power")
            add("epwatch_gpu_power_watts", watts)
        energy = self._call(f"gpu {gpu} energy", lambda: lib.amdsmi_get_energy_count(h))
        if isinstance(energy, Mapping):
            ticks = _first(energy, "energy_accumulator", "power")  # "power" before ROCm 6.1
            resolution_uj = _number(energy.get("counter_resolution"))
            if ticks is not None and resolution_uj is not None:
                add("epwatch_gpu_energy_joules_total", ticks, resolution_uj * 1e-6)
        temp_type = lib.AmdSmiTemperatureType
        sensors: list[Any] = []
        for sensor_name in ("HOTSPOT", "JUNCTION", "EDGE"):  # die first: MI300 has no edge
            sensor = getattr(temp_type, sensor_name, None)
            if sensor is not None and sensor not in sensors:
                sensors.append(sensor)
        current = lib.AmdSmiTemperatureMetric.CURRENT
        for sensor in sensors:
            temp = self._call(
                f"gpu {gpu} temperature", lambda s=sensor: lib.amdsmi_get_temp_metric(h, s, current)
            )
            if _number(temp) is not None:
                add("epwatch_gpu_temperature_celsius", temp)
                break
        activity = self._call(f"gpu {gpu} activity", lambda: lib.amdsmi_get_gpu_activity(h))
        if isinstance(activity, Mapping):
            add("epwatch_gpu_utilization_ratio", activity.get("gfx_activity"), 0.01)
        vram = self._call(f"gpu {gpu} vram", lambda: lib.amdsmi_get_gpu_vram_usage(h))
        if isinstance(vram, Mapping):
            add("epwatch_gpu_memory_used_bytes", vram.get("vram_used"), 1024.0**2)  # MB
        ecc = self._call(f"gpu {gpu} ECC", lambda: lib.amdsmi_get_gpu_total_ecc_count(h))
        if isinstance(ecc, Mapping):
            add("epwatch_gpu_ecc_errors_total", ecc.get("correctable_count"), kind="corrected")
            add("epwatch_gpu_ecc_errors_total", ecc.get("uncorrectable_count"), kind="uncorrected")
        replay = getattr(lib, "amdsmi_get_gpu_pci_replay_counter", None)
        if replay is not None:
            add(
                "epwatch_gpu_pcie_replays_total",
                self._call(f"gpu {gpu} replays", lambda: replay(h)),
            )
        return out


def _number(value: Any) -> float | None:
    """amdsmi returns ints, floats, or "N/A" for unsupported fields."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value))
    except ValueError:
        return None


def _first(data: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if _number(data.get(key)) is not None:
            return data[key]
    return None
