"""Benchmarks of timm-inception-pcam: `python -m benchmarks.run --output benchmarks/results [--quick]`."""
