"""Benchmarks of maas-gateway: one module per component, run with ``python -m benchmarks NAME``."""
