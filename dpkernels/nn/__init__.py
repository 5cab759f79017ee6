"""Drop-in DP modules and the converter for existing models."""
from .convert import convert, register_converter
from .linear import DPLinear
from .module import DPModule

__all__ = ["DPLinear", "DPModule", "convert", "register_converter"]
