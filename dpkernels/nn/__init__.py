"""Drop-in DP modules, the registry of DP layers and the converter for existing models."""

from .attention import DPMultiheadAttention
from .conv import DPConv1d, DPConv2d
from .convert import convert, declare_flattened, register_converter
from .embedding import DPEmbedding
from .fallback import FALLBACK_MAX_PARAMETERS, DPFallbackWarning, FallbackPath
from .linear import DPLinear
from .module import DPModule
from .norm import DPGroupNorm, DPLayerNorm, DPRMSNorm
from .registry import register, register_dp_layer, registered

__all__ = [
    "DPConv1d",
    "DPConv2d",
    "DPEmbedding",
    "DPGroupNorm",
    "DPLayerNorm",
    "DPLinear",
    "DPModule",
    "DPMultiheadAttention",
    "DPRMSNorm",
    "DPFallbackWarning",
    "FALLBACK_MAX_PARAMETERS",
    "FallbackPath",
    "convert",
    "declare_flattened",
    "register",
    "register_converter",
    "register_dp_layer",
    "registered",
]
