"""Benchmarks, each runnable as ``python -m bluesky_deepfocus.benchmarks.<name>``."""
