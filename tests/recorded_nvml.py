"""An NVML backend that answers from a recording: there is no GPU here.

The recording (tests/fixtures/gpu/nvml_hgx_h100.json) is hand-written in the types and
units of nvidia-ml-py's answers; constants, error classes and ctypes structures come
from the real ``pynvml`` module. Shared by the sampler tests and
bench/agent_footprint.py.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any

import pynvml

RECORDING = Path(__file__).parent / "fixtures" / "gpu" / "nvml_hgx_h100.json"


class RecordedNvml:
    """NVML functions answering from a recording; constants come from real pynvml.

    Only non-callables and classes are delegated to pynvml, so a function the fake does
    not define raises AttributeError rather than reaching for libnvidia-ml.
    """

    def __init__(self, recording: dict[str, Any], field_values: bool = True) -> None:
        self.rec = recording
        self.gpus = {g["index"]: g for g in recording["gpus"]}
        self._structs = {i: pynvml.struct_c_nvmlDevice_t() for i in self.gpus}
        self.handles = {i: pynvml.c_nvmlDevice_t(s) for i, s in self._structs.items()}
        self.events: list[tuple[int, int]] = [(e["gpu"], e["xid"]) for e in recording["xid_events"]]
        self.registered: dict[int, int] = {}
        self.init_calls = 0
        self.field_calls = 0
        self.throughput_calls: list[int] = []
        if not field_values:
            self.nvmlDeviceGetFieldValues = self._no_field_values

    def __getattr__(self, name: str) -> Any:
        attr = getattr(pynvml, name)
        if callable(attr) and not isinstance(attr, type):
            raise AttributeError(name)
        return attr

    # --- helpers -----------------------------------------------------------------
    def _gpu(self, handle: Any) -> dict[str, Any]:
        address = ctypes.addressof(handle.contents)
        for index, struct in self._structs.items():
            if ctypes.addressof(struct) == address:
                gpu = self.gpus[index]
                if gpu.get("lost"):
                    raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
                return gpu
        raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def _no_field_values(self, handle: Any, field_ids: list[Any]) -> Any:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)

    # --- the NVML surface the sampler uses ----------------------------------------
    def nvmlInit(self) -> None:
        self.init_calls += 1

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        return self.handles[index]

    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        address = ctypes.addressof(handle.contents)
        for index, struct in self._structs.items():
            if ctypes.addressof(struct) == address:
                return index
        raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self.gpus[self.nvmlDeviceGetIndex(handle)]["uuid"]

    def nvmlDeviceGetClockInfo(self, handle: Any, clock: int) -> int:
        assert clock == pynvml.NVML_CLOCK_SM
        return self._gpu(handle)["clock_sm_mhz"]

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        return self._gpu(handle)["clocks_event_reasons"]

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return self._gpu(handle)["power_mw"]

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._gpu(handle)["temperature_c"]

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> Any:
        u = pynvml.c_nvmlUtilization_t()
        u.gpu = self._gpu(handle)["utilization"]["gpu"]
        u.memory = self._gpu(handle)["utilization"]["memory"]
        return u

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        m = pynvml.c_nvmlMemory_t()
        rec = self._gpu(handle)["memory"]
        m.total, m.used, m.free = rec["total"], rec["used"], rec["free"]
        return m

    def nvmlDeviceGetPcieThroughput(self, handle: Any, counter: int) -> int:
        self.throughput_calls.append(self.nvmlDeviceGetIndex(handle))
        rec = self._gpu(handle)["pcie_throughput_kbps"]
        return rec["tx"] if counter == pynvml.NVML_PCIE_UTIL_TX_BYTES else rec["rx"]

    def nvmlDeviceGetFieldValues(self, handle: Any, field_ids: list[Any]) -> Any:
        self.field_calls += 1
        gpu = self._gpu(handle)
        values = (pynvml.c_nvmlFieldValue_t * len(field_ids))()
        for i, request in enumerate(field_ids):
            fid, scope = request if isinstance(request, tuple) else (request, None)
            values[i].fieldId = fid
            values[i].scopeId = scope or 0
            key = str(fid) if scope is None else f"{fid}@{scope}"
            rec = gpu["field_values"].get(key)
            if rec is None:
                values[i].nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
                continue
            values[i].nvmlReturn = rec["nvmlReturn"]
            values[i].valueType = rec["valueType"]
            member = {1: "uiVal", 3: "ullVal", 0: "dVal"}[rec["valueType"]]
            setattr(values[i].value, member, rec["value"])
        return values

    # per-call fallbacks (old drivers without nvmlDeviceGetFieldValues)
    def _field(self, handle: Any, key: str) -> int:
        rec = self._gpu(handle)["field_values"][key]
        if rec["nvmlReturn"] != pynvml.NVML_SUCCESS:
            raise pynvml.NVMLError(rec["nvmlReturn"])
        return rec["value"]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        return self._field(handle, "83")

    def nvmlDeviceGetPcieReplayCounter(self, handle: Any) -> int:
        return self._field(handle, "94")

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter: int) -> int:
        assert counter == pynvml.NVML_VOLATILE_ECC
        corrected = error_type == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED
        return self._field(handle, "3" if corrected else "4")

    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]:
        return tuple(self._field(handle, k) for k in ("142", "143", "144", "145"))

    # XID events
    def nvmlEventSetCreate(self) -> Any:
        return pynvml.c_nvmlEventSet_t()

    def nvmlEventSetFree(self, event_set: Any) -> None:
        pass

    def nvmlDeviceRegisterEvents(self, handle: Any, types_mask: int, event_set: Any) -> None:
        self._gpu(handle)
        self.registered[self.nvmlDeviceGetIndex(handle)] = types_mask

    def nvmlEventSetWait(self, event_set: Any, timeout_ms: int) -> Any:
        if not self.events:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
        gpu, xid = self.events.pop(0)
        data = pynvml.c_nvmlEventData_t()
        data.device = self.handles[gpu]
        data.eventType = pynvml.nvmlEventTypeXidCriticalError
        data.eventData = xid
        return data


def load_recording() -> dict[str, Any]:
    return json.loads(RECORDING.read_text())


