"""torch.autograd.Functions of the DP layers: thin; the math lives in dpkernels.ops."""
from .linear import DPLinearFunction

__all__ = ["DPLinearFunction"]
