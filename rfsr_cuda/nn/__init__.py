"""nn modules over the ``flash_rfbias`` op: the RIB factor field, RIB window attention and SST's blocks."""
from .attention import ATTN_BACKENDS, GATE_TYPES, RIBWindowAttention, op_dtype, set_attn_backend
from .layers import (UPSAMPLER_TYPES, ConvFFN, LayerNorm2d, SSTBlock, SSTLayer, Upsampler, resize_up_conv,
                     up_conv_scale)
from .rib import RIB, clear_rib_caches, rib_features

__all__ = [
    "ATTN_BACKENDS", "GATE_TYPES", "UPSAMPLER_TYPES",
    "RIB", "rib_features", "clear_rib_caches",
    "RIBWindowAttention", "set_attn_backend", "op_dtype",
    "LayerNorm2d", "ConvFFN", "SSTLayer", "SSTBlock", "Upsampler", "resize_up_conv", "up_conv_scale",
]
