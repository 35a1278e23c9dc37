"""AMD sampler with injected amdsmi / rocm-smi backends: there is no GPU here.

The amdsmi backend answers from tests/fixtures/gpu/amdsmi_mi300x.json, the rocm-smi
runner prints tests/fixtures/gpu/rocm_smi_*.json; both are hand-written in the field
names, units and string formats of the real tools (see each file's _comment).
"""

from __future__ import annotations

import enum
import json
from pathlib import Path
from typing import Any

import pytest

from epwatch.agent.samplers import amd as amd_module
from epwatch.agent.samplers.amd import AmdSampler, parse_quantity, parse_rocm_smi
from epwatch.agent.samplers.base import run_sampler
from epwatch.agent.samplers.gpumap import parse_local_ranks

FIXTURES = Path(__file__).parent / "fixtures" / "gpu"


class AmdSmiLibraryException(Exception):
    """Stands in for amdsmi's exception of the same name (err_code + message)."""

    def __init__(self, err_code: str) -> None:
        super().__init__(f"Error code: {err_code}")
        self.err_code = err_code


class RecordedAmdSmi:
    """The slice of the amdsmi module the sampler uses, answering from a recording."""

    class AmdSmiClkType(enum.IntEnum):
        SYS = 0
        GFX = 0
        DF = 1
        DCEF = 2
        SOC = 3
        MEM = 4

    class AmdSmiTemperatureType(enum.IntEnum):
        EDGE = 0
        HOTSPOT = 1
        JUNCTION = 1
        VRAM = 2

    class AmdSmiTemperatureMetric(enum.IntEnum):
        CURRENT = 0

    def __init__(self, recording: dict[str, Any]) -> None:
        self.gpus = recording["gpus"]
        self.handles = [object() for _ in self.gpus]
        self.shut_down = False

    def _answer(self, handle: Any, key: str) -> Any:
        value = self.gpus[self.handles.index(handle)][key]
        if isinstance(value, dict) and "error" in value:
            raise AmdSmiLibraryException(value["error"])
        return value

    def amdsmi_init(self) -> None:
        pass

    def amdsmi_shut_down(self) -> None:
        self.shut_down = True

    def amdsmi_get_processor_handles(self) -> list[Any]:
        return list(self.handles)

    def amdsmi_get_clock_info(self, handle: Any, clk_type: Any) -> dict[str, Any]:
        assert clk_type == self.AmdSmiClkType.GFX
        return self._answer(handle, "clock_info_gfx")

    def amdsmi_get_power_info(self, handle: Any) -> dict[str, Any]:
        return self._answer(handle, "power_info")

    def amdsmi_get_energy_count(self, handle: Any) -> dict[str, Any]:
        return self._answer(handle, "energy_count")

    def amdsmi_get_temp_metric(self, handle: Any, sensor: Any, metric: Any) -> Any:
        assert metric == self.AmdSmiTemperatureMetric.CURRENT
        value = self._answer(handle, "temp_metric_current")[sensor.name]
        if isinstance(value, dict):
            raise AmdSmiLibraryException(value["error"])
        return value

    def amdsmi_get_gpu_activity(self, handle: Any) -> dict[str, Any]:
        return self._answer(handle, "gpu_activity")

    def amdsmi_get_gpu_vram_usage(self, handle: Any) -> dict[str, Any]:
        return self._answer(handle, "gpu_vram_usage")

    def amdsmi_get_gpu_total_ecc_count(self, handle: Any) -> dict[str, Any]:
        return self._answer(handle, "gpu_total_ecc_count")

    def amdsmi_get_gpu_pci_replay_counter(self, handle: Any) -> int:
        return self._answer(handle, "gpu_pci_replay_counter")


def _load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def _index(points):
    return {(p.name, tuple(sorted(p.labels.items()))): p.value for p in points}


def _key(name: str, **labels: str):
    return (name, tuple(sorted(labels.items())))


def test_amdsmi_values_and_units():
    lib = RecordedAmdSmi(_load("amdsmi_mi300x.json"))
    sampler = AmdSampler(amdsmi=lib)
    result = run_sampler(sampler)
    assert result.ok, result.error
    idx = _index(result.points)
    assert idx[_key("epwatch_gpu_sm_clock_hertz", gpu="0")] == 2100e6
    assert idx[_key("epwatch_gpu_sm_clock_hertz", gpu="2")] == 1300e6
    assert idx[_key("epwatch_gpu_power_watts", gpu="0")] == 712
    # energy = accumulator ticks x counter_resolution (uJ)
    assert idx[_key("epwatch_gpu_energy_joules_total", gpu="1")] == pytest.approx(
        3123456789013 * 15.3e-6
    )
    # EDGE is not supported on MI300X: the hotspot (junction) sensor answers
    assert idx[_key("epwatch_gpu_temperature_celsius", gpu="2")] == 98
    assert idx[_key("epwatch_gpu_utilization_ratio", gpu="0")] == 1.0
    assert idx[_key("epwatch_gpu_memory_used_bytes", gpu="0")] == 180000 * 1024**2  # MB
    assert idx[_key("epwatch_gpu_ecc_errors_total", gpu="2", kind="corrected")] == 5
    assert idx[_key("epwatch_gpu_pcie_replays_total", gpu="0")] == 0
    assert idx[_key("epwatch_gpu_local_rank", gpu="5")] == 5
    assert sampler.backend == "amdsmi"
    sampler.close()
    assert lib.shut_down


def test_unsupported_query_drops_only_its_series():
    result = run_sampler(AmdSampler(amdsmi=RecordedAmdSmi(_load("amdsmi_mi300x.json"))))
    idx = _index(result.points)
    assert _key("epwatch_gpu_ecc_errors_total", gpu="4", kind="corrected") not in idx
    assert _key("epwatch_gpu_ecc_errors_total", gpu="3", kind="corrected") in idx
    assert idx[_key("epwatch_gpu_sm_clock_hertz", gpu="4")] == 2100e6
    assert any("gpu 4 ECC" in s and "NOT_SUPPORTED" in s for s in result.skipped)


def test_older_amdsmi_field_names():
    """Before ROCm 6.1: cur_clk, energy in 'power', only average_socket_power."""
    rec = _load("amdsmi_mi300x.json")
    for g in rec["gpus"]:
        g["clock_info_gfx"] = {"cur_clk": 1900, "min_clk": 500, "max_clk": 2100, "sleep_clk": 0}
        g["energy_count"] = {"power": 1000000, "counter_resolution": 15.3, "timestamp": 1}
        g["power_info"] = {"average_socket_power": 650, "current_socket_power": "N/A"}
    idx = _index(AmdSampler(amdsmi=RecordedAmdSmi(rec)).collect())
    assert idx[_key("epwatch_gpu_sm_clock_hertz", gpu="0")] == 1900e6
    assert idx[_key("epwatch_gpu_energy_joules_total", gpu="0")] == pytest.approx(15.3)
    assert idx[_key("epwatch_gpu_power_watts", gpu="0")] == 650


def test_amdsmi_import_error_falls_back_to_rocm_smi(monkeypatch):
    """amdsmi's import raises KeyError without the library; rocm-smi takes over."""

    def broken_import() -> Any:
        raise KeyError("ROCM_PATH")

    monkeypatch.setattr(amd_module, "_import_amdsmi", broken_import)
    text = (FIXTURES / "rocm_smi_mi300x.json").read_text()
    sampler = AmdSampler(rocm_smi=lambda: text, local_ranks=parse_local_ranks("4,5,6,7"))
    result = run_sampler(sampler)
    assert result.ok, result.error
    assert sampler.backend == "rocm-smi"
    idx = _index(result.points)
    assert idx[_key("epwatch_gpu_sm_clock_hertz", gpu="0")] == 2100e6
    assert idx[_key("epwatch_gpu_sm_clock_hertz", gpu="2")] == 1300e6
    assert idx[_key("epwatch_gpu_temperature_celsius", gpu="2")] == 98.0  # junction, edge N/A
    assert idx[_key("epwatch_gpu_power_watts", gpu="0")] == 742.0
    assert idx[_key("epwatch_gpu_utilization_ratio", gpu="0")] == 1.0
    assert idx[_key("epwatch_gpu_memory_used_bytes", gpu="0")] == 188743680000
    assert idx[_key("epwatch_gpu_energy_joules_total", gpu="0")] == pytest.approx(3123050.8848738)
    assert idx[_key("epwatch_gpu_local_rank", gpu="4")] == 0
    assert _key("epwatch_gpu_local_rank", gpu="0") not in idx
    assert not any(dict(labels).get("gpu") == "system" for _, labels in idx)
    assert not result.skipped  # "N/A" is not a parse failure


def test_rocm_smi_values_with_units_inside():
    points, notes = parse_rocm_smi(_load("rocm_smi_units_in_values.json"))
    idx = _index(points)
    assert idx[_key("epwatch_gpu_temperature_celsius", gpu="0")] == 35.0  # "35.0c"
    assert idx[_key("epwatch_gpu_power_watts", gpu="0")] == 35.0  # "35.0W"
    assert idx[_key("epwatch_gpu_sm_clock_hertz", gpu="0")] == 852e6  # "(852Mhz)"
    assert idx[_key("epwatch_gpu_utilization_ratio", gpu="0")] == pytest.approx(0.07)
    assert idx[_key("epwatch_gpu_pcie_replays_total", gpu="0")] == 2
    assert idx[_key("epwatch_gpu_temperature_celsius", gpu="1")] == 61.0  # ["61.0"]
    assert idx[_key("epwatch_gpu_sm_clock_hertz", gpu="1")] == pytest.approx(1.2e9)
    assert _key("epwatch_gpu_power_watts", gpu="1") not in idx  # "N/A"
    assert _key("epwatch_gpu_utilization_ratio", gpu="1") not in idx
    assert len(notes) == 1 and "bogus" in notes[0]


@pytest.mark.parametrize(
    ("value", "unit", "expected"),
    [
        ("(1700Mhz)", None, 1.7e9),
        ("1700MHz", None, 1.7e9),
        ("35.0c", None, 35.0),
        ("54.0", "C", 54.0),
        ("266.0 W", None, 266.0),
        ("742.0", "W", 742.0),
        ("42%", None, 0.42),
        ("99", "%", 0.99),
        ("3123050884873.8", "uJ", 3123050.8848738),
        ("N/A", "W", None),
        ("12 furlongs", None, None),
        (17, None, 17.0),
        (None, None, None),
    ],
)
def test_parse_quantity(value, unit, expected):
    got = parse_quantity(value, unit)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_nothing_available_is_a_clear_state(monkeypatch):
    def broken_import() -> Any:
        raise KeyError("ROCM_PATH")

    monkeypatch.setattr(amd_module, "_import_amdsmi", broken_import)
    monkeypatch.setattr(amd_module.shutil, "which", lambda name: None)
    result = run_sampler(AmdSampler())
    assert not result.ok
    assert result.error.startswith("AMD SMI unavailable: amdsmi: KeyError")
    assert "rocm-smi not found" in result.error
