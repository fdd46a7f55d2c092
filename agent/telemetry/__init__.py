"""OpenTelemetry providers, exporters and the engine metrics producer."""
