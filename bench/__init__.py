"""Benchmarks of bencher-runner against hand-written references (see shared/design/BENCHMARKS.md)."""
