"""Named SST presets with the official hyper-parameters: ``create_model(name, **overrides)``, ``list_models()``.

The presets build ×2 models; pass ``upscaling_factor=3`` or ``4`` for the other scales (only the upsampler's
``up_conv`` changes). "+" variants use the larger cyclic windows [16, 32, 48, 32, 48, 96] (and were trained on
96-pixel LR patches instead of 64); the architecture is otherwise identical, so their parameter counts match.

``sst_xl`` is rfsr's own: the official SST-XL was released only as SST-XL+ (``sst_xl_plus``). ``sst_xl`` pairs the
XL widths with the standard windows [16, 32, 64, 16, 32, 64], like the other non-"+" models. It has no released
weights; SST-XL+ checkpoints also load into it (same shapes) but compute a different function there, so use
``sst_xl_plus`` for them.
"""
from __future__ import annotations

from .sst import SST, SSTConfig

_WINDOWS = (16, 32, 64, 16, 32, 64)
_WINDOWS_LIGHT = (8, 16, 32, 16, 32, 64)
_WINDOWS_PLUS = (16, 32, 48, 32, 48, 96)
_COMMON = dict(attn_type="RIB", rib_hidden_dim=32, rib_n_freqs=10, gate_type="DWC", upscaling_factor=2)

_LIGHT = dict(dim=48, num_heads=(3,) * 6, ranks=(16, 16, 16, 24, 24, 24), n_blocks=5, exp_ratio=1.5,
              upsampler_type="pixelshuffle_direct")
_BASE = dict(dim=180, num_heads=(6,) * 6, ranks=(18, 18, 18, 34, 34, 34), n_blocks=6, exp_ratio=1.25,
             upsampler_type="pixelshuffle", intermediate_dim=64)
_LARGE = dict(dim=192, num_heads=(6,) * 6, ranks=(16, 16, 16, 32, 32, 32), n_blocks=8, exp_ratio=2,
              upsampler_type="pixelshuffle", intermediate_dim=96)
_XL = dict(dim=224, num_heads=(7,) * 6, ranks=(16, 16, 16, 32, 32, 32), n_blocks=10, exp_ratio=2,
           upsampler_type="pixelshuffle", intermediate_dim=96)

PRESETS: dict[str, SSTConfig] = {
    "sst_light": SSTConfig(**_COMMON, **_LIGHT, window_sizes=_WINDOWS_LIGHT),
    "sst_light_plus": SSTConfig(**_COMMON, **_LIGHT, window_sizes=_WINDOWS_PLUS),
    "sst": SSTConfig(**_COMMON, **_BASE, window_sizes=_WINDOWS),
    "sst_plus": SSTConfig(**_COMMON, **_BASE, window_sizes=_WINDOWS_PLUS),
    "sst_large": SSTConfig(**_COMMON, **_LARGE, window_sizes=_WINDOWS),
    "sst_large_plus": SSTConfig(**_COMMON, **_LARGE, window_sizes=_WINDOWS_PLUS),
    "sst_xl": SSTConfig(**_COMMON, **_XL, window_sizes=_WINDOWS),
    "sst_xl_plus": SSTConfig(**_COMMON, **_XL, window_sizes=_WINDOWS_PLUS),
}

# Architecture names of the official configs and checkpoint files (e.g. SSTLarge_Plus_DFLIP_X4.pth).
OFFICIAL_NAMES: dict[str, str] = {
    "sst_light": "SSTlight", "sst_light_plus": "SSTlight_Plus", "sst": "SST", "sst_plus": "SST_Plus",
    "sst_large": "SSTLarge", "sst_large_plus": "SSTLarge_Plus", "sst_xl_plus": "SSTXL_Plus",
}


def list_models() -> list[str]:
    """Preset names, sorted."""
    return sorted(PRESETS)


def get_config(name: str, **overrides) -> SSTConfig:
    """The preset's SSTConfig with ``overrides`` (any SSTConfig field) applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown SST preset {name!r}; expected one of {list_models()}")
    unknown = set(overrides) - set(SSTConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)} for preset {name!r}; expected SSTConfig fields "
                        f"{sorted(SSTConfig.__dataclass_fields__)}")
    return PRESETS[name].replace(**overrides)


def create_model(name: str, **overrides) -> SST:
    """Build preset ``name`` (see ``list_models()``), e.g. ``create_model('sst_light', upscaling_factor=4)``."""
    return SST.from_config(get_config(name, **overrides))
