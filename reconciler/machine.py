"""What a node reads of its own machine: capacity (CPUs, memory, GPUs) and load samples.

`read_capacity` and `LoadSampler` read the machine (psutil, and NVML for GPUs); the
heartbeat (`heartbeat.py`) carries both on the node's branch. Values are rounded (one
decimal for CPU percent, whole bytes per second for network rates) so the node file
stays small.

NVML sits behind `Nvml`, a thin wrapper over the `pynvml` module; tests hand it a
stand-in with the same function names. A node without the NVIDIA driver (or without
`pynvml`) simply has no GPUs.
"""
from __future__ import annotations

import logging
import math
import time
from collections import deque
from typing import Any

import psutil

from reconciler.clock import utcnow

log = logging.getLogger(__name__)

HISTORY_WINDOW_S = 300.0
RETRY_INIT_S = 60.0  # how often a node without NVML looks for it again (a driver installed later)
_LOOPBACK_PREFIX = "lo"


class Nvml:
    """The few NVML calls Winslow makes. `lib` is the `pynvml` module, or a stand-in with its names.

    It initialises on first use; when the library or the driver is missing it says so
    once, at INFO, and from then on reports no GPUs.
    """

    def __init__(self, lib: Any = None) -> None:
        self._lib = lib
        self._ready: bool | None = None  # None: not tried yet
        self._tried = 0.0  # when initialising last failed: a driver installed later is found on a retry
        self._said = False

    @property
    def available(self) -> bool:
        if self._ready is None or (not self._ready and time.monotonic() - self._tried >= RETRY_INIT_S):
            self._ready = self._init()
            self._tried = time.monotonic()
        return self._ready

    def _init(self) -> bool:
        if self._lib is None:
            try:
                import pynvml
            except ImportError:
                self._say("no GPUs: the pynvml package (nvidia-ml-py) is not installed")
                return False
            self._lib = pynvml
        try:
            self._lib.nvmlInit()
        except Exception as exc:  # noqa: BLE001 - NVMLError and its many kinds: no driver, no library
            self._say(f"no GPUs: NVML is not available ({exc})")
            return False
        if self._said:
            log.info("NVML is available now: its GPUs count from the next heartbeat")
        return True

    def _say(self, message: str) -> None:
        if not self._said:
            log.info(message)
        self._said = True

    def _handles(self) -> list[tuple[int, Any]]:
        if not self.available:
            return []
        try:
            count = int(self._lib.nvmlDeviceGetCount())
        except Exception as exc:  # noqa: BLE001
            log.warning("cannot count GPUs through NVML: %s", exc)
            return []
        handles = []
        for index in range(count):
            try:
                handles.append((index, self._lib.nvmlDeviceGetHandleByIndex(index)))
            except Exception as exc:  # noqa: BLE001 - one broken GPU does not hide the others
                log.warning("cannot reach GPU %d through NVML: %s", index, exc)
        return handles

    def devices(self) -> list[dict[str, Any]]:
        """Each GPU's index (NVML's, which is PCI bus order), UUID, model and memory in bytes."""
        found = []
        for index, handle in self._handles():
            try:
                found.append({
                    "index": index,
                    "uuid": _text(self._lib.nvmlDeviceGetUUID(handle)),
                    "model": _text(self._lib.nvmlDeviceGetName(handle)),
                    "memory": int(self._lib.nvmlDeviceGetMemoryInfo(handle).total),
                })
            except Exception as exc:  # noqa: BLE001
                log.warning("cannot read GPU %d through NVML: %s", index, exc)
        return found

    def host(self) -> dict[str, int]:
        """The CPUs and memory (bytes) of the machine these GPUs are in: this one (a Slurm node's is its partition)."""
        return {"cpus": psutil.cpu_count() or 1, "memory": int(psutil.virtual_memory().total)}

    def load(self) -> list[dict[str, Any]]:
        """Each GPU's utilisation (percent), memory used (bytes) and temperature (°C); missing values left out."""
        sensor = getattr(self._lib, "NVML_TEMPERATURE_GPU", 0)
        readings = []
        for index, handle in self._handles():
            reading: dict[str, Any] = {"index": index}
            _read(reading, "utilization", lambda h=handle: int(self._lib.nvmlDeviceGetUtilizationRates(h).gpu))
            _read(reading, "memory_used", lambda h=handle: int(self._lib.nvmlDeviceGetMemoryInfo(h).used))
            _read(reading, "temperature", lambda h=handle: int(self._lib.nvmlDeviceGetTemperature(h, sensor)))
            readings.append(reading)
        return readings

    def close(self) -> None:
        if self._ready:
            try:
                self._lib.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down is best effort
                log.debug("nvmlShutdown failed", exc_info=True)
        self._ready = None


def read_capacity(nvml: Nvml | None = None) -> dict[str, Any]:
    """This node's CPUs, memory (bytes) and GPUs, as the heartbeat's `capacity`."""
    nvml = nvml if nvml is not None else Nvml()
    return {**nvml.host(), "gpus": nvml.devices()}


class LoadSampler:
    """Samples the node's load and keeps the last `window` seconds of samples for the viewer's charts."""

    def __init__(self, interval: float = 5.0, window: float = HISTORY_WINDOW_S, nvml: Nvml | None = None) -> None:
        self._nvml = nvml if nvml is not None else Nvml()
        self._history: deque[dict[str, Any]] = deque(maxlen=max(1, math.ceil(window / max(interval, 0.001))))
        psutil.cpu_percent(None)  # the first sample measures from here, not from boot
        self._net = _net_bytes()
        self._net_at = time.monotonic()

    def sample(self) -> dict[str, Any]:
        now = time.monotonic()
        net = _net_bytes()
        elapsed = now - self._net_at
        rx, tx = (_rate(net[i] - self._net[i], elapsed) for i in (0, 1))
        self._net, self._net_at = net, now
        memory = psutil.virtual_memory()
        sample = {
            "time": utcnow(),
            "cpu_percent": round(float(psutil.cpu_percent(None)), 1),
            "memory_used": int(memory.total - memory.available),
            "net_rx": rx,
            "net_tx": tx,
            "gpus": self._nvml.load(),
        }
        self._history.append(sample)
        return sample

    def history(self) -> list[dict[str, Any]]:
        return list(self._history)


def _net_bytes() -> tuple[int, int]:
    """Bytes received and sent on every interface but loopback (local git traffic is not network IO)."""
    rx = tx = 0
    for nic, counters in psutil.net_io_counters(pernic=True).items():
        if nic.startswith(_LOOPBACK_PREFIX):
            continue
        rx += counters.bytes_recv
        tx += counters.bytes_sent
    return rx, tx


def _rate(delta: int, elapsed: float) -> int:
    if elapsed <= 0 or delta <= 0:  # an interface that went away makes the sum shrink
        return 0
    return int(round(delta / elapsed))


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _read(reading: dict[str, Any], key: str, query: Any) -> None:
    try:
        reading[key] = query()
    except Exception as exc:  # noqa: BLE001 - GPUs without a sensor or counter are common
        log.debug("GPU %s: %s not available: %s", reading["index"], key, exc)
