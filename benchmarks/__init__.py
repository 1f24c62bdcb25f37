"""Benchmark suites of mtlfast (pytest-benchmark) and their report; see benchmarks/results/README.md."""
