"""mtlfast's benchmark suites and their report: see benchmarks/results/README.md."""
