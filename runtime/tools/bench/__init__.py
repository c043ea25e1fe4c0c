"""Benchmarks (``python -m tilegraph bench <suite>``): measurements, never tests."""
