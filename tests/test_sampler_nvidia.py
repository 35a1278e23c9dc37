"""NVIDIA sampler with an injected NVML backend: there is no GPU here.

The backend answers from tests/fixtures/gpu/nvml_hgx_h100.json (hand-written in the
types and units of nvidia-ml-py's answers) using the real ``pynvml`` module's
constants, error classes and ctypes structures (``c_nvmlFieldValue_t``,
``c_nvmlEventData_t``, ``c_nvmlMemory_t``...): importing pynvml works without a GPU,
only ``nvmlInit`` fails (see test_sampler_registry for that path).
"""

from __future__ import annotations

import types
from typing import Any

import pynvml
import pytest

from epwatch.agent.samplers.base import run_sampler
from epwatch.agent.samplers.gpumap import LocalRankMap, parse_local_ranks
from epwatch.agent.samplers.nvidia import NvidiaSampler, decode_reasons, reason_bits
from tests.recorded_nvml import RecordedNvml, load_recording


def _index(points):
    return {(p.name, tuple(sorted(p.labels.items()))): p.value for p in points}


def _key(name: str, **labels: str):
    return (name, tuple(sorted(labels.items())))


@pytest.fixture
def backend() -> RecordedNvml:
    return RecordedNvml(load_recording())


def test_reason_bitmask_decodes_with_real_constants():
    mask = pynvml.nvmlClocksEventReasonHwThermalSlowdown | pynvml.nvmlClocksEventReasonSwPowerCap
    decoded = decode_reasons(mask, pynvml)
    assert {r for r, on in decoded.items() if on} == {"hw_thermal_slowdown", "sw_power_cap"}
    assert len(decoded) == 9
    # every bit of nvmlClocksEventReasonAll has a name
    assert all(decode_reasons(pynvml.nvmlClocksEventReasonAll, pynvml).values())
    assert not any(decode_reasons(pynvml.nvmlClocksEventReasonNone, pynvml).values())


def test_reason_bitmask_with_pre_12_535_constant_names():
    old = types.SimpleNamespace(
        **{n: getattr(pynvml, n) for n in dir(pynvml) if n.startswith("nvmlClocksThrottleReason")}
    )
    assert not hasattr(old, "nvmlClocksEventReasonHwThermalSlowdown")
    assert dict(reason_bits(old)) == dict(reason_bits(pynvml))
    mask = pynvml.nvmlClocksThrottleReasonHwSlowdown | pynvml.nvmlClocksThrottleReasonGpuIdle
    on = {r for r, active in decode_reasons(mask, old).items() if active}
    assert on == {"hw_slowdown", "gpu_idle"}


def test_values_and_units(backend):
    idx = _index(NvidiaSampler(nvml=backend).collect())
    assert idx[_key("epwatch_gpu_sm_clock_hertz", gpu="0")] == 1980e6
    assert idx[_key("epwatch_gpu_power_watts", gpu="0")] == 612.0  # from mW
    assert idx[_key("epwatch_gpu_temperature_celsius", gpu="0")] == 58
    assert idx[_key("epwatch_gpu_utilization_ratio", gpu="0")] == pytest.approx(0.97)
    assert idx[_key("epwatch_gpu_memory_used_bytes", gpu="0")] == 79870001152
    assert idx[_key("epwatch_gpu_pcie_transmit_bytes_per_second", gpu="1")] == 21000 * 1024
    assert idx[_key("epwatch_gpu_pcie_receive_bytes_per_second", gpu="1")] == 19000 * 1024
    assert idx[_key("epwatch_gpu_energy_joules_total", gpu="0")] == pytest.approx(412345678.901)
    assert idx[_key("epwatch_gpu_nvlink_transmit_bytes_total", gpu="0")] == 9876543210 * 1024
    assert idx[_key("epwatch_gpu_nvlink_receive_bytes_total", gpu="0")] == 9876500000 * 1024
    assert idx[_key("epwatch_gpu_nvlink_errors_total", gpu="0", kind="crc_flit")] == 0
    assert idx[_key("epwatch_gpu_pcie_replays_total", gpu="0")] == 0
    assert idx[_key("epwatch_gpu_local_rank", gpu="7")] == 7
    assert idx[_key("epwatch_gpu_lost", gpu="0")] == 0


def test_pcie_rate_from_byte_counters_where_the_driver_has_them(backend):
    now = [100.0]
    sampler = NvidiaSampler(nvml=backend, clock=lambda: now[0])
    first = _index(sampler.collect())
    tx = "epwatch_gpu_pcie_transmit_bytes_per_second"
    assert _key(tx, gpu="0") not in first  # a rate needs two rounds
    assert 0 not in backend.throughput_calls  # and no 20 ms throughput call either
    assert 1 in backend.throughput_calls
    backend.gpus[0]["field_values"]["197"]["value"] += 3_000_000_000
    backend.gpus[0]["field_values"]["198"]["value"] += 1_000_000_000
    now[0] = 102.0
    second = _index(sampler.collect())
    assert second[_key(tx, gpu="0")] == 1.5e9
    assert second[_key("epwatch_gpu_pcie_receive_bytes_per_second", gpu="0")] == 0.5e9


def test_throttled_gpu_reports_its_reasons(backend):
    idx = _index(NvidiaSampler(nvml=backend).collect())
    active = {
        labels[1][1]
        for (name, labels), value in idx.items()
        if name == "epwatch_gpu_clock_event_active" and dict(labels)["gpu"] == "3" and value
    }
    assert active == {"hw_thermal_slowdown", "sw_thermal_slowdown"}
    assert idx[_key("epwatch_gpu_clock_event_active", gpu="1", reason="sw_power_cap")] == 1
    assert idx[_key("epwatch_gpu_clock_event_active", gpu="0", reason="hw_thermal_slowdown")] == 0
    assert idx[_key("epwatch_gpu_sm_clock_hertz", gpu="3")] == 1410e6
    assert idx[_key("epwatch_gpu_ecc_errors_total", gpu="3", kind="corrected")] == 12
    assert idx[_key("epwatch_gpu_remapped_rows", gpu="3", kind="correctable")] == 3
    assert idx[_key("epwatch_gpu_remapped_rows", gpu="3", kind="pending")] == 1


def test_lost_gpu_is_a_state_not_a_failure(backend):
    result = run_sampler(NvidiaSampler(nvml=backend))
    assert result.ok
    idx = _index(result.points)
    assert idx[_key("epwatch_gpu_lost", gpu="5")] == 1.0
    keep = {"epwatch_gpu_lost", "epwatch_gpu_local_rank", "epwatch_gpu_xid_errors_total"}
    gpu5 = {name for name, labels in idx if dict(labels).get("gpu") == "5"}
    assert gpu5 == keep  # nothing else is made up for a lost GPU
    assert idx[_key("epwatch_gpu_local_rank", gpu="5")] == 5
    # the neighbours are unaffected
    assert idx[_key("epwatch_gpu_sm_clock_hertz", gpu="4")] == 1980e6
    assert idx[_key("epwatch_gpu_sm_clock_hertz", gpu="6")] == 345e6


def test_gpu_lost_before_its_handle_was_taken():
    class LostAtStart(RecordedNvml):
        def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
            if index == 2:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
            return super().nvmlDeviceGetHandleByIndex(index)

    result = run_sampler(NvidiaSampler(nvml=LostAtStart(load_recording())))
    assert result.ok
    idx = _index(result.points)
    assert idx[_key("epwatch_gpu_lost", gpu="2")] == 1.0
    assert idx[_key("epwatch_gpu_lost", gpu="1")] == 0.0
    assert _key("epwatch_gpu_sm_clock_hertz", gpu="2") not in idx


def test_unsupported_field_drops_only_that_series(backend):
    idx = _index(NvidiaSampler(nvml=backend).collect())
    assert _key("epwatch_gpu_ecc_errors_total", gpu="6", kind="corrected") not in idx
    assert _key("epwatch_gpu_ecc_errors_total", gpu="7", kind="corrected") in idx
    assert _key("epwatch_gpu_energy_joules_total", gpu="6") in idx


def test_counters_are_batched_in_one_field_values_call_per_gpu(backend):
    NvidiaSampler(nvml=backend).collect()
    assert backend.field_calls == 7  # 8 GPUs, one lost before its counters are read


def test_per_call_fallback_without_field_values_api():
    batched = _index(NvidiaSampler(nvml=RecordedNvml(load_recording())).collect())
    backend = RecordedNvml(load_recording(), field_values=False)
    sampler = NvidiaSampler(nvml=backend)
    result = run_sampler(sampler)
    assert result.ok
    fallback = _index(result.points)
    for name in (
        "epwatch_gpu_energy_joules_total",
        "epwatch_gpu_pcie_replays_total",
    ):
        assert fallback[_key(name, gpu="3")] == batched[_key(name, gpu="3")]
    for kind in ("correctable", "pending"):
        key = _key("epwatch_gpu_remapped_rows", gpu="3", kind=kind)
        assert fallback[key] == batched[key]
    key = _key("epwatch_gpu_ecc_errors_total", gpu="3", kind="corrected")
    assert fallback[key] == batched[key]
    assert any("FieldValues" in s for s in result.skipped)  # said once, then remembered
    assert not any("FieldValues" in s for s in run_sampler(sampler).skipped)


def test_xid_events_are_counted_per_gpu_and_code(backend):
    sampler = NvidiaSampler(nvml=backend)
    idx = _index(sampler.collect())
    assert idx[_key("epwatch_gpu_xid_errors_total", gpu="3", xid="48")] == 1
    assert idx[_key("epwatch_gpu_xid_errors_total", gpu="3", xid="94")] == 1
    assert idx[_key("epwatch_gpu_xid_errors_total", gpu="5", xid="79")] == 1
    assert backend.registered[0] & pynvml.nvmlEventTypeXidCriticalError
    # counters keep their value and grow with new events
    backend.events.append((3, 48))
    idx = _index(sampler.collect())
    assert idx[_key("epwatch_gpu_xid_errors_total", gpu="3", xid="48")] == 2
    assert idx[_key("epwatch_gpu_xid_errors_total", gpu="5", xid="79")] == 1


def test_explicit_local_rank_mapping(backend):
    ranks = parse_local_ranks("4,5,6,7")
    idx = _index(NvidiaSampler(nvml=backend, local_ranks=ranks).collect())
    assert idx[_key("epwatch_gpu_local_rank", gpu="4")] == 0
    assert idx[_key("epwatch_gpu_local_rank", gpu="7")] == 3
    assert _key("epwatch_gpu_local_rank", gpu="0") not in idx


def test_uuid_mapping_and_env():
    backend = RecordedNvml(load_recording())
    uuid2 = backend.gpus[2]["uuid"]
    ranks = parse_local_ranks(f"{uuid2[:12]},3")
    idx = _index(NvidiaSampler(nvml=backend, local_ranks=ranks).collect())
    assert idx[_key("epwatch_gpu_local_rank", gpu="2")] == 0
    assert idx[_key("epwatch_gpu_local_rank", gpu="3")] == 1
    env = parse_local_ranks("env", {"CUDA_VISIBLE_DEVICES": "6,7,-1,0"})
    assert env == LocalRankMap(("6", "7"))  # CUDA stops at the first invalid entry
    assert parse_local_ranks("env", {}) == LocalRankMap()
    with pytest.raises(ValueError):
        parse_local_ranks("0,one")


def test_init_failure_is_unavailable_and_retried_later():
    class NoLibrary(RecordedNvml):
        def nvmlInit(self) -> None:
            self.init_calls += 1
            raise pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)

    backend = NoLibrary(load_recording())
    now = [0.0]
    sampler = NvidiaSampler(nvml=backend, retry_init_s=60.0, clock=lambda: now[0])
    first = run_sampler(sampler)
    assert not first.ok and first.error == "NVML unavailable: NVIDIA driver not loaded"
    assert not run_sampler(sampler).ok
    assert backend.init_calls == 1  # not retried before retry_init_s
    now[0] = 61.0
    run_sampler(sampler)
    assert backend.init_calls == 2
