"""Sidecar injection: a mutating admission webhook that adds mlsidecar to labelled pods.

    template = SidecarTemplate.load(Path("/etc/mlsidecar-injector/template.json"))
    response = admission_response(review, template)   # AdmissionReview in, AdmissionReview out
    python -m agent.inject --listen 0.0.0.0:8443 --template ... --tls-cert ... --tls-key ...

The Helm chart renders the template (`injector.enabled`) from the same named templates that
put the sidecar into its own Deployment, so injected and charted pods get the same sidecar.
"""

from agent.inject.patch import (
    INJECT_LABEL,
    INJECTED_ANNOTATION,
    MODEL_CONTAINER_ANNOTATION,
    SidecarTemplate,
    admission_response,
    pod_patch,
)

__all__ = [
    "INJECTED_ANNOTATION",
    "INJECT_LABEL",
    "MODEL_CONTAINER_ANNOTATION",
    "SidecarTemplate",
    "admission_response",
    "pod_patch",
]
