"""The silent-signal proof-of-effect benchmark (`python -m benchmarks.silent_signal`)."""
