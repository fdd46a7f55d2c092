"""The pod's resources: the sidecar's process and host, its own cgroup, the model
service's process against its container's limits, and GPUs (docs/resources.md)."""

from agent.resources.cgroup import CgroupReading, OwnCgroup
from agent.resources.discovery import ModelProcess
from agent.resources.gpu import GpuReading, Gpus
from agent.resources.monitor import ResourceMonitor, ResourceSample
from agent.resources.process import ProcessReader, ProcessReading, Unreadable

__all__ = [
    "CgroupReading",
    "GpuReading",
    "Gpus",
    "ModelProcess",
    "OwnCgroup",
    "ProcessReader",
    "ProcessReading",
    "ResourceMonitor",
    "ResourceSample",
    "Unreadable",
]
