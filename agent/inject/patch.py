"""The webhook's logic: a pod and the chart's sidecar template in, a JSON Patch out.

    template = SidecarTemplate.load(path)
    ops = pod_patch(pod, template)            # [] when the pod opted out or has the sidecar
    admission_response(review, template)      # {"apiVersion": "admission.k8s.io/v1", ...}

A ConfigMap cannot be mounted from another namespace, so an injected sidecar gets its
config as ``MLSIDECAR_<SECTION>`` JSON env (the agent merges env key by key) instead of the
chart's ConfigMap volume; Secrets named by the values must exist in the pod's namespace.
"""

from __future__ import annotations

import base64
import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INJECT_LABEL = "mlsidecar.io/inject"
# Which container is the model (its limits reach the sidecar); default: the first one.
MODEL_CONTAINER_ANNOTATION = "mlsidecar.io/model-container"
INJECTED_ANNOTATION = "mlsidecar.io/injected"
# How the sidecar finds the model's process (resources.model.process_name / cmdline).
PROCESS_NAME_ANNOTATION = "mlsidecar.io/model-process-name"
CMDLINE_ANNOTATION = "mlsidecar.io/model-cmdline"
CONFIG_VOLUME = "mlsidecar-config"
DATA_VOLUME = "mlsidecar-data"
# service.name / service.version of an injected pod: its recommended labels, else `app`.
NAME_LABELS = ("app.kubernetes.io/name", "app")
VERSION_LABEL = "app.kubernetes.io/version"


def _pointer(*parts: str | int) -> str:
    """A JSON Pointer (RFC 6901): '/metadata/annotations/mlsidecar.io~1injected'."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


@dataclass(frozen=True)
class SidecarTemplate:
    """What the chart renders for the injector (templates/injector.yaml, template.json)."""

    init_containers: list[dict[str, Any]]
    containers: list[dict[str, Any]]
    volumes: list[dict[str, Any]]
    model_env: list[dict[str, Any]]
    config: dict[str, Any]
    share_process_namespace: bool
    # The container name the template's resourceFieldRefs use, replaced by the pod's model.
    model_container: str
    version: str

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SidecarTemplate:
        try:
            return cls(
                init_containers=list(data["initContainers"] or []),
                containers=list(data["containers"] or []),
                volumes=list(data["volumes"]),
                model_env=list(data["modelEnv"]),
                config=dict(data["config"]),
                share_process_namespace=bool(data["shareProcessNamespace"]),
                model_container=str(data["modelContainer"]),
                version=str(data["version"]),
            )
        except KeyError as error:
            raise ValueError(f"sidecar template: missing key {error.args[0]!r}") from None

    @classmethod
    def load(cls, path: Path) -> SidecarTemplate:
        return cls.from_dict(json.loads(path.read_text()))

    @property
    def sidecar_names(self) -> set[str]:
        return {c["name"] for c in self.init_containers + self.containers}


def _config_env(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The agent config as one JSON env variable per top-level section."""
    return [
        {"name": f"MLSIDECAR_{section.upper()}", "value": json.dumps(value, sort_keys=True)}
        for section, value in sorted(config.items())
    ]


@dataclass(frozen=True)
class PodFacts:
    """What this pod changes in the template: its model container, name, version, process."""

    model: str
    service_name: str | None
    service_version: str | None
    process: dict[str, str]


def _pod_config(template: SidecarTemplate, facts: PodFacts) -> dict[str, Any]:
    config = copy.deepcopy(template.config)
    if facts.service_name:
        config.setdefault("telemetry", {})["service_name"] = facts.service_name
    if facts.process:
        config.setdefault("resources", {})["model"] = dict(facts.process)
    return config


def _sidecar(
    container: dict[str, Any], template: SidecarTemplate, facts: PodFacts
) -> dict[str, Any]:
    """The template's sidecar for this pod: config as env, this pod's model and names."""
    sidecar = copy.deepcopy(container)
    env = [e for e in sidecar.get("env", []) if e["name"] != "MLSIDECAR_CONFIG"]
    for entry in env:
        ref = entry.get("valueFrom", {}).get("resourceFieldRef")
        if ref and ref.get("containerName") == template.model_container:
            ref["containerName"] = facts.model
        if entry["name"] == "OTEL_SERVICE_NAME" and facts.service_name:
            entry["value"] = facts.service_name
        if entry["name"] == "OTEL_RESOURCE_ATTRIBUTES":
            for key, value in (("service.name", facts.service_name),
                               ("service.version", facts.service_version)):  # fmt: skip
                if value:
                    entry["value"] = re.sub(
                        rf"{re.escape(key)}=[^,]*", f"{key}={value}", entry["value"]
                    )
    sidecar["env"] = _config_env(_pod_config(template, facts)) + env
    sidecar["volumeMounts"] = [
        m for m in sidecar.get("volumeMounts", []) if m["name"] != CONFIG_VOLUME
    ]
    return sidecar


def pod_patch(pod: dict[str, Any], template: SidecarTemplate) -> list[dict[str, Any]]:
    """JSON Patch operations adding the sidecar to ``pod``; [] when there is nothing to do."""
    metadata = pod.get("metadata") or {}
    labels = metadata.get("labels") or {}
    annotations = metadata.get("annotations") or {}
    spec = pod["spec"]
    containers = spec.get("containers") or []
    present = {c["name"] for c in containers + (spec.get("initContainers") or [])}
    if labels.get(INJECT_LABEL) == "false" or present & template.sidecar_names:
        return []  # opted out, or injected already (the webhook may be called twice)
    if not containers:
        raise ValueError("spec.containers: the pod has no container to monitor")
    model = annotations.get(MODEL_CONTAINER_ANNOTATION) or containers[0]["name"]
    indices = [i for i, c in enumerate(containers) if c["name"] == model]
    if not indices:
        raise ValueError(
            f"metadata.annotations.{MODEL_CONTAINER_ANNOTATION}: no container {model!r} "
            f"(have: {', '.join(c['name'] for c in containers)})"
        )
    facts = PodFacts(
        model=model,
        service_name=next((labels[k] for k in NAME_LABELS if labels.get(k)), None),
        service_version=labels.get(VERSION_LABEL),
        process={
            key: annotations[name]
            for key, name in (
                ("process_name", PROCESS_NAME_ANNOTATION),
                ("cmdline", CMDLINE_ANNOTATION),
            )
            if annotations.get(name)
        },
    )
    taken = {v["name"] for v in spec.get("volumes") or []}
    clash = taken & {v["name"] for v in template.volumes if v["name"] != CONFIG_VOLUME}
    if clash:
        raise ValueError(f"spec.volumes: the pod already has volume(s) {sorted(clash)}")

    ops: list[dict[str, Any]] = []
    if template.init_containers:
        if "initContainers" not in spec:
            ops.append({"op": "add", "path": "/spec/initContainers", "value": []})
        # First, so that the pod's own init containers can already log to it.
        for offset, container in enumerate(template.init_containers):
            sidecar = _sidecar(container, template, facts)
            ops.append(
                {"op": "add", "path": _pointer("spec", "initContainers", offset), "value": sidecar}
            )
    for container in template.containers:
        sidecar = _sidecar(container, template, facts)
        ops.append({"op": "add", "path": "/spec/containers/-", "value": sidecar})
    if "volumes" not in spec:
        ops.append({"op": "add", "path": "/spec/volumes", "value": []})
    for volume in template.volumes:
        if volume["name"] == CONFIG_VOLUME:
            continue
        if volume["name"] == DATA_VOLUME and "emptyDir" not in volume:
            volume = {"name": DATA_VOLUME, "emptyDir": {}}  # the chart's claim is not this pod's
        ops.append({"op": "add", "path": "/spec/volumes/-", "value": copy.deepcopy(volume)})
    index = indices[0]
    known = {e["name"] for e in containers[index].get("env") or []}
    if "env" not in containers[index]:
        ops.append({"op": "add", "path": _pointer("spec", "containers", index, "env"), "value": []})
    for entry in template.model_env:
        if entry["name"] not in known:  # the pod's own value wins
            path = _pointer("spec", "containers", index, "env", "-")
            ops.append({"op": "add", "path": path, "value": copy.deepcopy(entry)})
    if template.share_process_namespace or facts.process:
        ops.append({"op": "add", "path": "/spec/shareProcessNamespace", "value": True})
    if "annotations" not in metadata:
        ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
    path = _pointer("metadata", "annotations", INJECTED_ANNOTATION)
    ops.append({"op": "add", "path": path, "value": template.version})
    return ops


def admission_response(review: dict[str, Any], template: SidecarTemplate) -> dict[str, Any]:
    """An AdmissionReview (admission.k8s.io/v1) answering ``review``: always allowed; with a
    JSON Patch when the sidecar is added, with a warning when it cannot be."""
    request = review.get("request") or {}
    response: dict[str, Any] = {"uid": request.get("uid", ""), "allowed": True}
    pod = request.get("object")
    if request.get("kind", {}).get("kind") == "Pod" and isinstance(pod, dict):
        try:
            ops = pod_patch(pod, template)
        except (ValueError, KeyError, TypeError) as error:
            response["warnings"] = [f"mlsidecar sidecar not injected: {error}"]
            ops = []
        if ops:
            response["patchType"] = "JSONPatch"
            response["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
