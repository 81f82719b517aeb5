"""Long measurements (BENCHMARKS.md), each run as a module from the repository root: `python -m bench.<name>`."""
