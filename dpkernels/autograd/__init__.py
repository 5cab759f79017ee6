"""torch.autograd.Functions of the DP layers: thin; the math lives in dpkernels.ops."""

from .attention import DPPackedProjectionFunction, DPSplitProjectionFunction
from .conv import DPConvFunction
from .embedding import DPEmbeddingFunction
from .linear import DPLinearFunction
from .norm import DPGroupNormFunction, DPLayerNormFunction, DPRMSNormFunction

__all__ = [
    "DPConvFunction",
    "DPEmbeddingFunction",
    "DPGroupNormFunction",
    "DPLayerNormFunction",
    "DPLinearFunction",
    "DPPackedProjectionFunction",
    "DPRMSNormFunction",
    "DPSplitProjectionFunction",
]
