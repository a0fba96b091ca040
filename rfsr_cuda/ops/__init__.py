"""The attention op and its oracle; the LayerNorm, depthwise-conv and window partition/merge ops of the model's
inference path."""
from .depthwise import depthwise_conv3x3, depthwise_taps, op_param
from .flash_rfbias import cuda_kernels_built, flash_rfbias
from .layer_norm import layer_norm_padded
from .reference import flash_rfbias_concat, flash_rfbias_reference
from .windows import window_merge, window_partition

__all__ = ["flash_rfbias", "cuda_kernels_built", "flash_rfbias_reference", "flash_rfbias_concat", "layer_norm_padded", "depthwise_conv3x3",
           "depthwise_taps", "op_param", "window_merge", "window_partition"]
