"""Adapters that let other DP frameworks call dpkernels' kernels (imported on demand only)."""
