"""Training: HR-folder data with on-the-fly MATLAB-bicubic LR, and the L1/AdamW/EMA loop with exact resume, in one
process or several (torchrun + DistributedDataParallel)."""
from .data import HRFolderDataset, list_images, load_validation_set
from .distributed import DistInfo, ShardedSampleRange, dist_info, distributed_session
from .loop import (ModelEMA, TrainConfig, WarmupSchedule, find_latest_checkpoint, load_training_state,
                   save_training_state, train, validate)

__all__ = [
    "HRFolderDataset",
    "list_images",
    "load_validation_set",
    "ModelEMA",
    "TrainConfig",
    "WarmupSchedule",
    "find_latest_checkpoint",
    "load_training_state",
    "save_training_state",
    "train",
    "validate",
    "DistInfo",
    "ShardedSampleRange",
    "dist_info",
    "distributed_session",
]
