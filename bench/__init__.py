"""Benchmark suite for streamgroup (issue 5): `python -m bench` writes docs/benchmarks.md.

Scripts, not timed tests: one private Debian redis-server 7.0, every approach side by side in one
run. tests/test_bench_smoke.py runs the whole suite at a tiny size so it cannot rot.
"""
