"""Benchmarks run by `make bench` (mixer.benchmarks.run)."""
