"""Headless helpers: a ComfyUI runtime in-process or as a server, and synthetic
checkpoints in the official formats for machines without model weights.

Used by the demo (``python -m headless.demo``), the tests and the benchmarks;
ComfyUI itself never imports this package.
"""
