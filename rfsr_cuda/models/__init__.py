"""The SST model family: config, model, named presets, checkpoints and CUDA-graph inference."""
from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .cuda_graph import CUDAGraphForward
from .presets import OFFICIAL_NAMES, PRESETS, create_model, get_config, list_models
from .sst import SST, SSTConfig

__all__ = [
    "SST", "SSTConfig", "create_model", "get_config", "list_models", "PRESETS", "OFFICIAL_NAMES",
    "load_checkpoint", "save_checkpoint", "model_from_checkpoint", "CUDAGraphForward",
]
