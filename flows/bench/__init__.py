"""Benchmarks of each stage: python -m flows.bench.ingest | train | tune."""
