"""rfsr: fused attention with a rank-factorised positional bias, and the SST super-resolution transformer."""
from .ops import flash_rfbias, flash_rfbias_concat, flash_rfbias_reference

reference = flash_rfbias_reference  # the pure-PyTorch oracle every kernel is tested against

__version__ = "0.1.0"
__all__ = ["flash_rfbias", "flash_rfbias_concat", "flash_rfbias_reference", "reference"]
