"""torch.autograd.Functions of the DP layers: thin; the math lives in dpkernels.ops."""
from .embedding import DPEmbeddingFunction
from .linear import DPLinearFunction
from .norm import DPGroupNormFunction, DPLayerNormFunction, DPRMSNormFunction

__all__ = ["DPEmbeddingFunction", "DPGroupNormFunction", "DPLayerNormFunction", "DPLinearFunction", "DPRMSNormFunction"]
