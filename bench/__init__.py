"""Benchmark scripts (run as files: `python bench/<name>.py`); a package so that mypy
names bench/kernels.py `bench.kernels`, apart from the `kernels` package."""
