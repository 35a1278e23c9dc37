"""The per-EP-group collector: ingest, sliding windows, estimators, /metrics."""
