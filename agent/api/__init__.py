"""Admin HTTP API (FastAPI)."""
