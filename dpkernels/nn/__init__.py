"""Drop-in DP modules and the converter for existing models."""
from .attention import DPMultiheadAttention
from .conv import DPConv1d, DPConv2d
from .convert import convert, register_converter
from .embedding import DPEmbedding
from .linear import DPLinear
from .module import DPModule
from .norm import DPGroupNorm, DPLayerNorm, DPRMSNorm

__all__ = [
    "DPConv1d", "DPConv2d", "DPEmbedding", "DPGroupNorm", "DPLayerNorm", "DPLinear", "DPModule", "DPMultiheadAttention", "DPRMSNorm",
    "convert", "register_converter",
]
