"""GPUs through NVML (the ``pynvml`` module of nvidia-ml-py), when there are any.

    gpus = Gpus()              # or Gpus(nvml=module) to inject one (tests)
    gpus.read()                # [] without nvidia-ml-py, a driver or a device
    gpus.close()

No GPU is not an error: it is said once at start (info) and nothing is exported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    index: int
    uuid: str
    name: str
    utilization: float | None  # 0..1, share of time a kernel ran
    memory_used: int | None
    memory_total: int | None
    temperature_c: float | None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Gpus:
    """NVML devices; ``available`` is False (with ``problem``) when there are none to read."""

    def __init__(self, nvml: Any | None = None) -> None:
        self.problem: str | None = None
        self._nvml: Any | None = None
        self._devices: list[tuple[int, Any, str, str]] = []
        if nvml is None:
            try:
                import pynvml
            except ImportError:
                self.problem = "nvidia-ml-py is not installed"
                log.debug("no GPU metrics: %s", self.problem)
                return
            nvml = pynvml
        try:
            nvml.nvmlInit()
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                name = _text(nvml.nvmlDeviceGetName(handle))
                self._devices.append((index, handle, uuid, name))
        except Exception as error:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
            self.problem = f"NVML unavailable: {error}"
            log.info("no GPU metrics: %s", self.problem)
            return
        self._nvml = nvml
        if not self._devices:
            self.problem = "NVML found no GPU"
        log.info("GPU metrics from NVML", extra={"gpus": len(self._devices)})

    @property
    def available(self) -> bool:
        return bool(self._devices)

    def read(self) -> list[GpuReading]:
        nvml = self._nvml
        if nvml is None:
            return []
        readings = []
        for index, handle, uuid, name in self._devices:
            readings.append(
                GpuReading(
                    index=index,
                    uuid=uuid,
                    name=name,
                    utilization=self._try(
                        lambda h=handle: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100
                    ),
                    memory_used=self._try(lambda h=handle: nvml.nvmlDeviceGetMemoryInfo(h).used),
                    memory_total=self._try(lambda h=handle: nvml.nvmlDeviceGetMemoryInfo(h).total),
                    temperature_c=self._try(
                        lambda h=handle: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)
                    ),
                )
            )
        return readings

    @staticmethod
    def _try(read: Any) -> Any:
        # One device or query not supported (NVMLError_NotSupported) leaves that value out.
        try:
            return read()
        except Exception:
            return None

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                log.debug("nvmlShutdown failed", exc_info=True)
            self._nvml = None
