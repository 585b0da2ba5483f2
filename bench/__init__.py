"""Benchmarks of greupd in the real-kernel lab: see bench/run and BENCHMARKS.md."""
