"""The attention op and its oracle."""
from .flash_rfbias import flash_rfbias
from .reference import flash_rfbias_concat, flash_rfbias_reference

__all__ = ["flash_rfbias", "flash_rfbias_reference", "flash_rfbias_concat"]
