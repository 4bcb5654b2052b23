"""Benchmarks, not tests: each prints figures. Run them from the repo root as `python bench/<name>.py`."""
