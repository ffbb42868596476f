"""Benchmarks of ComfyUI-BalancedControl (run as scripts or `python -m benchmarks.NAME`)."""
