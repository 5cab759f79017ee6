"""dpkernels: fused kernels for differentially private training in PyTorch."""
__version__ = "0.1.0"
