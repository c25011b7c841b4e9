"""Benchmarks: `fast-xlstm bench` (ours vs the official xlstm package)."""
