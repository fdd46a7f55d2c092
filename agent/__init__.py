"""mlsidecar: the monitoring sidecar for ML model services."""

__version__ = "0.1.0"
