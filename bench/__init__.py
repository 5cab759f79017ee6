"""Benchmarks of dpkernels (not part of the package). Entry point: ``python -m bench`` (see README.md)."""
