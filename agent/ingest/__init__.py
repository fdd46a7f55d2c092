"""Receivers: gRPC and HTTP ingest, validation, backpressure."""
