"""Benchmarks of sapd-nfq against no filter, an accept-only NFQUEUE callback and a
userspace relay, in the namespace lab: `python -m bench` (see bench/run.py)."""
