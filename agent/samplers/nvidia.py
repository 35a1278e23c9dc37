"""NVIDIA GPUs through NVML (``nvidia-ml-py``, imported as ``pynvml``).

What a straggler diagnosis needs from each GPU: SM clock and the clock-event
(throttle) reasons that explain a low one, power/energy/temperature, utilisation and
memory, PCIe and NVLink throughput and error counters, ECC and row remapping, XID
events, and whether the GPU is lost (``NVML_ERROR_GPU_IS_LOST``: fell off the bus).

The counters are read in one ``nvmlDeviceGetFieldValues`` call per GPU where the
driver has it, with per-call fallbacks otherwise. Every NVML call goes through
``self.nv`` (the ``pynvml`` module by default) so tests can inject a backend built
from recorded outputs; constants and error classes come from the same object.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from epwatch.agent.samplers.base import Sampler, SamplerUnavailable
from epwatch.agent.samplers.gpumap import LocalRankMap
from epwatch.catalogue import Point, metric

# Contract reason label -> NVML constant suffix (nvmlClocksEventReason<X>; before
# nvidia-ml-py 12.535 only nvmlClocksThrottleReason<X> existed, same bits).
_REASONS: tuple[tuple[str, str], ...] = (
    ("gpu_idle", "GpuIdle"),
    ("applications_clocks_setting", "ApplicationsClocksSetting"),
    ("sw_power_cap", "SwPowerCap"),
    ("hw_slowdown", "HwSlowdown"),
    ("sync_boost", "SyncBoost"),
    ("sw_thermal_slowdown", "SwThermalSlowdown"),
    ("hw_thermal_slowdown", "HwThermalSlowdown"),
    ("hw_power_brake_slowdown", "HwPowerBrakeSlowdown"),
    ("display_clock_setting", "DisplayClockSetting"),
)

_UINT_MAX = 0xFFFFFFFF  # field scopeId: aggregate over all NVLinks


def reason_bits(nv: Any) -> list[tuple[str, int]]:
    """(label, bit) for every clock-event reason this pynvml knows."""
    out = []
    for label, suffix in _REASONS:
        bit = getattr(nv, "nvmlClocksEventReason" + suffix, None)
        if bit is None:
            bit = getattr(nv, "nvmlClocksThrottleReason" + suffix, None)
        if bit is not None:
            out.append((label, int(bit)))
    return out


def decode_reasons(mask: int, nv: Any) -> dict[str, bool]:
    """Bitmask from ``nvmlDeviceGetCurrentClocksEventReasons`` -> {reason: active}."""
    return {label: bool(mask & bit) for label, bit in reason_bits(nv)}


# Batched per GPU through nvmlDeviceGetFieldValues:
# (NVML field constant, scope id, metric, extra labels, scale to base units)
_FIELDS: tuple[tuple[str, int | None, str, dict[str, str], float], ...] = (
    ("TOTAL_ENERGY_CONSUMPTION", None, "energy_joules_total", {}, 1e-3),  # mJ
    ("PCIE_REPLAY_COUNTER", None, "pcie_replays_total", {}, 1.0),
    ("ECC_SBE_VOL_TOTAL", None, "ecc_errors_total", {"kind": "corrected"}, 1.0),
    ("ECC_DBE_VOL_TOTAL", None, "ecc_errors_total", {"kind": "uncorrected"}, 1.0),
    ("NVLINK_CRC_FLIT_ERROR_COUNT_TOTAL", None, "nvlink_errors_total", {"kind": "crc_flit"}, 1.0),
    ("NVLINK_CRC_DATA_ERROR_COUNT_TOTAL", None, "nvlink_errors_total", {"kind": "crc_data"}, 1.0),
    ("NVLINK_REPLAY_ERROR_COUNT_TOTAL", None, "nvlink_errors_total", {"kind": "replay"}, 1.0),
    ("NVLINK_RECOVERY_ERROR_COUNT_TOTAL", None, "nvlink_errors_total", {"kind": "recovery"}, 1.0),
    # KiB counters; scope UINT_MAX sums every link
    ("NVLINK_THROUGHPUT_DATA_TX", _UINT_MAX, "nvlink_transmit_bytes_total", {}, 1024.0),
    ("NVLINK_THROUGHPUT_DATA_RX", _UINT_MAX, "nvlink_receive_bytes_total", {}, 1024.0),
    ("REMAPPED_COR", None, "remapped_rows", {"kind": "correctable"}, 1.0),
    ("REMAPPED_UNC", None, "remapped_rows", {"kind": "uncorrectable"}, 1.0),
    ("REMAPPED_PENDING", None, "remapped_rows", {"kind": "pending"}, 1.0),
    ("REMAPPED_FAILURE", None, "remapped_rows", {"kind": "failure"}, 1.0),
    # byte counters (newer drivers): turned into the per-second gauges between rounds,
    # which spares nvmlDeviceGetPcieThroughput its 20 ms sampling wait per call
    ("PCIE_COUNT_TX_BYTES", None, "pcie_transmit_bytes_per_second", {}, 1.0),
    ("PCIE_COUNT_RX_BYTES", None, "pcie_receive_bytes_per_second", {}, 1.0),
)


def _field_specs(nv: Any) -> list[tuple[int, int | None, str, dict[str, str], float]]:
    """(field id, scope id, metric, extra labels, scale) for the fields this pynvml knows."""
    out = []
    for const, scope, name, labels, scale in _FIELDS:
        field_id = getattr(nv, "NVML_FI_DEV_" + const, None)
        if field_id is not None:
            out.append((int(field_id), scope, "epwatch_gpu_" + name, labels, scale))
    return out


def value_members(nv: Any) -> dict[int, str]:
    """``valueType`` -> the ``nvmlValue_t`` union member that holds the number."""
    return {
        int(nv.NVML_VALUE_TYPE_DOUBLE): "dVal",
        int(nv.NVML_VALUE_TYPE_UNSIGNED_INT): "uiVal",
        int(nv.NVML_VALUE_TYPE_UNSIGNED_LONG): "ulVal",
        int(nv.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG): "ullVal",
        int(nv.NVML_VALUE_TYPE_SIGNED_LONG_LONG): "sllVal",
        int(getattr(nv, "NVML_VALUE_TYPE_SIGNED_INT", 5)): "siVal",
        int(getattr(nv, "NVML_VALUE_TYPE_UNSIGNED_SHORT", 6)): "usVal",
    }


def field_value(nv: Any, fv: Any, members: dict[int, str] | None = None) -> float:
    """The number in an ``nvmlFieldValue_t``, by its ``valueType``."""
    member = (members or value_members(nv)).get(int(fv.valueType), "ullVal")
    return float(getattr(fv.value, member))


@dataclass(frozen=True)
class _Constants:
    """What the sampler needs from the NVML module, looked up once per init.

    Per round they were looked up per GPU and per field value: about a thousand
    attribute reads for 8 GPUs, a third of the sampler's time.
    """

    success: int
    lost: int
    not_supported: int
    clock_sm: int
    temperature_gpu: int
    pcie_tx: int
    pcie_rx: int
    reasons: list[tuple[str, int]]
    reasons_fn: Callable[[Any], int]
    fields: list[tuple[int, int | None, str, dict[str, str], float]]
    request: list[int | tuple[int, int]]
    members: dict[int, str]

    @classmethod
    def of(cls, nv: Any) -> _Constants:
        fields = _field_specs(nv)
        reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
        if reasons_fn is None:  # nvidia-ml-py before 12.535
            reasons_fn = nv.nvmlDeviceGetCurrentClocksThrottleReasons
        return cls(
            success=nv.NVML_SUCCESS,
            lost=nv.NVML_ERROR_GPU_IS_LOST,
            not_supported=nv.NVML_ERROR_NOT_SUPPORTED,
            clock_sm=nv.NVML_CLOCK_SM,
            temperature_gpu=nv.NVML_TEMPERATURE_GPU,
            pcie_tx=nv.NVML_PCIE_UTIL_TX_BYTES,
            pcie_rx=nv.NVML_PCIE_UTIL_RX_BYTES,
            reasons=reason_bits(nv),
            reasons_fn=reasons_fn,
            fields=fields,
            request=[fid if scope is None else (fid, scope) for fid, scope, *_ in fields],
            members=value_members(nv),
        )


class _GpuLost(Exception):
    pass


def _load_pynvml() -> Any:
    try:
        import pynvml
    except Exception as exc:  # ImportError, or a broken install
        raise SamplerUnavailable(
            f"NVML unavailable: nvidia-ml-py is not installed ({type(exc).__name__}: {exc})"
        ) from exc
    return pynvml


def _init_error(nv: Any, exc: Exception) -> str:
    value = getattr(exc, "value", None)
    if value == getattr(nv, "NVML_ERROR_LIBRARY_NOT_FOUND", object()):
        return "NVML unavailable: libnvidia-ml.so.1 not found"
    if value == getattr(nv, "NVML_ERROR_DRIVER_NOT_LOADED", object()):
        return "NVML unavailable: NVIDIA driver not loaded"
    return f"NVML unavailable: {type(exc).__name__}: {exc}"


class NvidiaSampler(Sampler):
    """All NVIDIA GPUs of the node, one ``gpu`` label (NVML index) each."""

    name = "nvidia"

    def __init__(
        self,
        nvml: Any | None = None,
        local_ranks: LocalRankMap | None = None,
        retry_init_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        max_events_per_round: int = 256,
    ) -> None:
        super().__init__()
        self._given = nvml
        self.nv: Any = None
        self._c: _Constants | None = None
        self.local_ranks = local_ranks or LocalRankMap()
        self.retry_init_s = retry_init_s
        self.clock = clock
        self.max_events = max_events_per_round
        self._ready = False
        self._unavailable: str | None = None
        self._retry_at = 0.0
        self._count = 0
        self._handles: dict[int, Any] = {}
        self._uuids: dict[int, str] = {}
        self._events: Any = None
        self._xids: dict[tuple[int, int], int] = {}
        self._batch = True  # field-values API usable until it says otherwise
        self._pcie_counted: set[str] = set()  # GPUs whose PCIe rate comes from counters
        self._pcie_prev: dict[tuple[str, str], tuple[float, float]] = {}

    # --- life cycle --------------------------------------------------------------
    def _ensure_init(self) -> None:
        if self._ready:
            return
        if self._unavailable is not None and self.clock() < self._retry_at:
            raise SamplerUnavailable(self._unavailable)
        nv = self._given if self._given is not None else _load_pynvml()
        try:
            nv.nvmlInit()
            self._count = int(nv.nvmlDeviceGetCount())
        except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self._unavailable = _init_error(nv, exc)
            self._retry_at = self.clock() + self.retry_init_s
            raise SamplerUnavailable(self._unavailable) from exc
        self.nv, self._ready, self._unavailable = nv, True, None
        self._c = _Constants.of(nv)
        self._handles, self._uuids = {}, {}
        try:
            self._events = nv.nvmlEventSetCreate()
        except Exception as exc:
            self._events = None
            self.skip("nvmlEventSetCreate (XID events off)", exc)
        for index in range(self._count):
            # lost or failing now: collect() retries the handle and reports the state
            with contextlib.suppress(Exception):
                self._handle(index)

    def close(self) -> None:
        if not self._ready:
            return
        nv = self.nv
        try:
            if self._events is not None:
                nv.nvmlEventSetFree(self._events)
            nv.nvmlShutdown()
        except Exception:
            pass
        self._ready = False

    def _is_lost(self, exc: Exception) -> bool:
        return getattr(exc, "value", None) == self._consts.lost

    def _handle(self, index: int) -> Any:
        """Handle of GPU ``index`` (registered for XID events once); raises _GpuLost."""
        handle = self._handles.get(index)
        if handle is not None:
            return handle
        nv = self.nv
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
        except nv.NVMLError as exc:
            if self._is_lost(exc):
                raise _GpuLost from exc
            raise
        self._handles[index] = handle
        try:
            uuid = nv.nvmlDeviceGetUUID(handle)
            self._uuids[index] = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        except nv.NVMLError:
            pass
        if self._events is not None:
            try:
                nv.nvmlDeviceRegisterEvents(handle, nv.nvmlEventTypeXidCriticalError, self._events)
            except nv.NVMLError as exc:
                self.skip(f"gpu {index} XID events", exc)
        return handle

    # --- one round ---------------------------------------------------------------
    def collect(self) -> list[Point]:
        self._ensure_init()
        points: list[Point] = []
        for index in range(self._count):
            gpu = str(index)
            lost = False
            try:
                points.extend(self._gpu(index, gpu))
            except _GpuLost:
                lost = True
            except self.nv.NVMLError as exc:
                self.skip(f"gpu {gpu}", exc)
            rank = self.local_ranks.local_rank(index, self._uuids.get(index))
            if rank is not None:
                points.append(metric("epwatch_gpu_local_rank", rank, gpu=gpu))
            points.append(metric("epwatch_gpu_lost", 1.0 if lost else 0.0, gpu=gpu))
        points.extend(self._xid_points())
        return points

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """One NVML read: None if unsupported/failed (noted), _GpuLost if the GPU is gone."""
        try:
            return fn()
        except self.nv.NVMLError as exc:
            if self._is_lost(exc):
                raise _GpuLost from exc
            if getattr(exc, "value", None) != self._consts.not_supported:
                self.skip(what, exc)
            return None

    @property
    def _consts(self) -> _Constants:
        assert self._c is not None, "NVML not initialised"
        return self._c

    def _gpu(self, index: int, gpu: str) -> list[Point]:
        nv, c = self.nv, self._consts
        h = self._handle(index)
        out: list[Point] = []
        sm = c.clock_sm
        clock = self._call(f"gpu {gpu} SM clock", lambda: nv.nvmlDeviceGetClockInfo(h, sm))
        if clock is not None:
            out.append(metric("epwatch_gpu_sm_clock_hertz", clock * 1e6, gpu=gpu))
        mask = self._call(f"gpu {gpu} clock-event reasons", lambda: c.reasons_fn(h))
        if mask is not None:
            mask = int(mask)
            for reason, bit in c.reasons:
                active = 1.0 if mask & bit else 0.0
                out.append(metric("epwatch_gpu_clock_event_active", active, gpu=gpu, reason=reason))
        power = self._call(f"gpu {gpu} power", lambda: nv.nvmlDeviceGetPowerUsage(h))
        if power is not None:
            out.append(metric("epwatch_gpu_power_watts", power / 1000.0, gpu=gpu))  # mW
        sensor = c.temperature_gpu
        temp = self._call(f"gpu {gpu} temperature", lambda: nv.nvmlDeviceGetTemperature(h, sensor))
        if temp is not None:
            out.append(metric("epwatch_gpu_temperature_celsius", temp, gpu=gpu))
        util = self._call(f"gpu {gpu} utilization", lambda: nv.nvmlDeviceGetUtilizationRates(h))
        if util is not None:
            out.append(metric("epwatch_gpu_utilization_ratio", util.gpu / 100.0, gpu=gpu))
        mem = self._call(f"gpu {gpu} memory", lambda: nv.nvmlDeviceGetMemoryInfo(h))
        if mem is not None:
            out.append(metric("epwatch_gpu_memory_used_bytes", mem.used, gpu=gpu))
        out.extend(self._counters(h, gpu))
        if gpu in self._pcie_counted:
            return out
        for counter, name in (
            (c.pcie_tx, "epwatch_gpu_pcie_transmit_bytes_per_second"),
            (c.pcie_rx, "epwatch_gpu_pcie_receive_bytes_per_second"),
        ):
            kbps = self._call(
                f"gpu {gpu} {name}", lambda c=counter: nv.nvmlDeviceGetPcieThroughput(h, c)
            )
            if kbps is not None:  # NVML reports KB/s (1024 bytes)
                out.append(metric(name, kbps * 1024.0, gpu=gpu))
        return out

    def _pcie_rate(self, gpu: str, name: str, count: float) -> Point | None:
        """Bytes/s from a PCIe byte counter and the previous round's value."""
        self._pcie_counted.add(gpu)
        now = self.clock()
        previous = self._pcie_prev.get((gpu, name))
        self._pcie_prev[(gpu, name)] = (now, count)
        if previous is None or now <= previous[0] or count < previous[1]:
            return None  # first round, or the counter wrapped
        return metric(name, (count - previous[1]) / (now - previous[0]), gpu=gpu)

    def _counters(self, h: Any, gpu: str) -> list[Point]:
        """Energy, replays, ECC, NVLink, row remapping: one batched call where possible."""
        nv, c = self.nv, self._consts
        if self._batch:
            try:
                values = nv.nvmlDeviceGetFieldValues(h, c.request)
            except nv.NVMLError as exc:
                if self._is_lost(exc):
                    raise _GpuLost from exc
                self._batch = False  # old driver: FUNCTION_NOT_FOUND / NOT_SUPPORTED
                self.skip("nvmlDeviceGetFieldValues (using per-call reads)", exc)
            else:
                out = []
                for (_, _, name, labels, scale), fv in zip(c.fields, values, strict=False):
                    ret = int(fv.nvmlReturn)
                    if ret == c.lost:
                        raise _GpuLost
                    if ret != c.success:
                        continue  # this field is not supported here (ECC off, no NVLink...)
                    value = field_value(nv, fv, c.members) * scale
                    if name.endswith("_per_second"):
                        rate = self._pcie_rate(gpu, name, value)
                        if rate is not None:
                            out.append(rate)
                        continue
                    out.append(metric(name, value, gpu=gpu, **labels))
                return out
        return self._counters_per_call(h, gpu)

    def _counters_per_call(self, h: Any, gpu: str) -> list[Point]:
        nv = self.nv
        out: list[Point] = []
        energy = self._call(f"gpu {gpu} energy", lambda: nv.nvmlDeviceGetTotalEnergyConsumption(h))
        if energy is not None:
            out.append(metric("epwatch_gpu_energy_joules_total", energy / 1000.0, gpu=gpu))  # mJ
        replays = self._call(f"gpu {gpu} replays", lambda: nv.nvmlDeviceGetPcieReplayCounter(h))
        if replays is not None:
            out.append(metric("epwatch_gpu_pcie_replays_total", replays, gpu=gpu))
        for err_type, kind in (
            (nv.NVML_MEMORY_ERROR_TYPE_CORRECTED, "corrected"),
            (nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, "uncorrected"),
        ):
            count = self._call(
                f"gpu {gpu} ECC {kind}",
                lambda t=err_type: nv.nvmlDeviceGetTotalEccErrors(h, t, nv.NVML_VOLATILE_ECC),
            )
            if count is not None:
                out.append(metric("epwatch_gpu_ecc_errors_total", count, gpu=gpu, kind=kind))
        rows = self._call(f"gpu {gpu} remapped rows", lambda: nv.nvmlDeviceGetRemappedRows(h))
        if rows is not None:
            for kind, value in zip(
                ("correctable", "uncorrectable", "pending", "failure"), rows, strict=False
            ):
                out.append(metric("epwatch_gpu_remapped_rows", value, gpu=gpu, kind=kind))
        return out

    def _xid_points(self) -> list[Point]:
        """Drain the XID event set (non-blocking) and report the running counts."""
        nv = self.nv
        if self._events is not None:
            for _ in range(self.max_events):
                try:
                    event = nv.nvmlEventSetWait(self._events, 0)
                except nv.NVMLError as exc:
                    if getattr(exc, "value", None) != nv.NVML_ERROR_TIMEOUT:
                        self.skip("XID events", exc)
                    break
                if not int(event.eventType) & nv.nvmlEventTypeXidCriticalError:
                    continue
                index = self._event_gpu(event)
                key = (index, int(event.eventData))
                self._xids[key] = self._xids.get(key, 0) + 1
        return [
            metric(
                "epwatch_gpu_xid_errors_total",
                count,
                gpu=str(index) if index >= 0 else "unknown",
                xid=str(xid),
            )
            for (index, xid), count in sorted(self._xids.items())
        ]

    def _event_gpu(self, event: Any) -> int:
        try:
            return int(self.nv.nvmlDeviceGetIndex(event.device))
        except Exception:
            return -1  # a device NVML can no longer index: keep the event anyway
