"""rfsr: fused attention with a rank-factorised positional bias, and the SST super-resolution transformer.

Layers, each importing only the ones above it: ``ops`` (the ``rfsr::flash_rfbias`` op and its oracle) ← ``nn``
(RIB factors, window attention, blocks) ← ``models`` (SST, presets, checkpoints) ← ``train``, ``metrics``,
``upscale``.
"""
from .ops import flash_rfbias, flash_rfbias_concat, flash_rfbias_reference
from .models import (SST, SSTConfig, create_model, list_models, load_checkpoint, model_from_checkpoint,
                     save_checkpoint)

reference = flash_rfbias_reference  # the pure-PyTorch oracle every kernel is tested against

__version__ = "0.1.0"
__all__ = [
    "flash_rfbias", "flash_rfbias_concat", "flash_rfbias_reference", "reference",
    "SST", "SSTConfig", "create_model", "list_models", "load_checkpoint", "model_from_checkpoint", "save_checkpoint",
]
