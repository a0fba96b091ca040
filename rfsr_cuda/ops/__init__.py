"""The attention op and its oracle; the padded LayerNorm op of the inference path."""
from .flash_rfbias import flash_rfbias
from .layer_norm import layer_norm_padded
from .reference import flash_rfbias_concat, flash_rfbias_reference

__all__ = ["flash_rfbias", "flash_rfbias_reference", "flash_rfbias_concat", "layer_norm_padded"]
