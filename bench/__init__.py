"""Benchmarks and scale runs (see bench/README.md); scripts, not timed tests."""
