"""Running VT.ai in production (docs/operations.md): health checks and Prometheus metrics."""
