"""SST checkpoints: official ``.pth`` files and rfsr's ``.safetensors`` files (weights + config in the metadata).

* Official files (BasicSR layout): ``{'params_ema': sd, 'params': sd}`` or a bare state dict; ``params_ema`` is
  preferred, a ``module.`` prefix is stripped; read with ``torch.load(weights_only=True)``.
* rfsr files: a safetensors state dict whose metadata holds ``format='rfsr.sst'`` and the ``SSTConfig`` as JSON.
* Scales: when a file's upsampler was made for another scale than the model's, its ``up_conv`` weight and bias are
  resized bilinearly, as the official loader does (×2 → ×3 → ×4 fine-tuning).
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ..nn import Upsampler, resize_up_conv, up_conv_scale
from .presets import PRESETS, get_config, list_models
from .sst import SST, SSTConfig

FORMAT = "rfsr.sst"
FORMAT_VERSION = "1"
_RESERVED_METADATA = ("format", "format_version", "config", "rfsr_version")
_EXPECTED = ("expected an official SST .pth file (a state dict, optionally under 'params_ema' or 'params') or an "
             "rfsr .safetensors file written by save_checkpoint")
# Config fields that may differ between a file and the model it is loaded into.
_FREE_FIELDS = ("upscaling_factor", "attn_backend")
# Fields an official state dict determines (all but window_sizes and attn_backend).
_SHAPE_FIELDS = ("dim", "num_heads", "n_blocks", "exp_ratio", "rib_hidden_dim", "rib_n_freqs", "upsampler_type",
                 "ranks", "gate_type", "intermediate_dim")

log = logging.getLogger(__name__)


def _reason(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _is_safetensors(path: str) -> bool:
    # Sniff the content, not the suffix: 8-byte little-endian header length, then the JSON header.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def _unwrap(obj, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "params_ema" in obj:
        obj = obj["params_ema"]
    elif isinstance(obj, dict) and "params" in obj:
        obj = obj["params"]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: holds {type(obj).__name__ if not isinstance(obj, dict) else 'an empty dict'}; "
                         f"{_EXPECTED}")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor; {_EXPECTED}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def read_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict[str, str] | None]:
    """``(state_dict, metadata)`` of a checkpoint file; metadata is None for .pth files. Tensors are on the CPU."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if _is_safetensors(path):
        try:
            with safe_open(path, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:
            raise ValueError(f"{path}: unreadable safetensors file ({_reason(e)}); {_EXPECTED}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read by torch.load(weights_only=True) ({_reason(e)}); {_EXPECTED}") \
            from e
    return _unwrap(obj, path), None


def _file_config(meta: dict[str, str] | None, path: str) -> SSTConfig | None:
    if meta is None or ("format" not in meta and "config" not in meta):
        return None  # an official file, or a bare safetensors state dict
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: safetensors metadata format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: rfsr checkpoint format version {meta.get('format_version')!r}; this rfsr reads "
                         f"version {FORMAT_VERSION!r} (a newer rfsr wrote it?)")
    try:
        return SSTConfig.from_json(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: metadata 'config' is not a valid SSTConfig JSON ({e})") from e


def rescale_upsampler(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with ``upsampler.up_conv`` resized to the model's scale when it was made for another one."""
    up = getattr(model, "upsampler", None)
    wk, bk = "upsampler.up_conv.weight", "upsampler.up_conv.bias"
    if not isinstance(up, Upsampler) or up.upsampler_type == "nn+conv" or wk not in state_dict \
            or bk not in state_dict:
        return state_dict
    w, b = state_dict[wk], state_dict[bk]
    if w.dim() != 4 or w.shape[1:] != up.up_conv.weight.shape[1:]:
        return state_dict  # not this architecture: the key check reports it
    s_in, s_out = up_conv_scale(up.upsampler_type, w), up.upscaling_factor
    if s_in == s_out or s_in < 1 or w.shape[0] != up.up_conv.weight.shape[0] // s_out ** 2 * s_in ** 2 \
            or b.shape != (w.shape[0],):
        return state_dict
    log.info("resizing upsampler.up_conv from x%d to x%d", s_in, s_out)
    w2, b2 = resize_up_conv(w.float(), b.float(), s_in, s_out)
    return {**state_dict, wk: w2.to(w.dtype), bk: b2.to(b.dtype)}


def _check_fits(model: nn.Module, sd: dict[str, torch.Tensor], path: str, strict: bool) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: file {list(sd[k].shape)} vs model {list(expected[k].shape)}"
              for k in sd if k in expected and sd[k].shape != expected[k].shape]
    problems = [f"{what} ({len(keys)}): {keys[:5]}{' ...' if len(keys) > 5 else ''}"
                for what, keys in (("shape mismatches", shapes), ("missing keys", missing if strict else []),
                                   ("unexpected keys", unexpected if strict else [])) if keys]
    if problems:
        raise ValueError(f"{path}: does not fit this {type(model).__name__}: " + "; ".join(problems) +
                         ". Expected a checkpoint of the same architecture (dim, heads, ranks, blocks, upsampler)")


def _load(model: nn.Module, sd: dict[str, torch.Tensor], meta, path: str, strict: bool):
    cfg = _file_config(meta, path)
    model_cfg = getattr(model, "config", None)
    if strict and cfg is not None and isinstance(model_cfg, SSTConfig):
        diff = [f"{f}: file {getattr(cfg, f)!r} vs model {getattr(model_cfg, f)!r}"
                for f in SSTConfig.__dataclass_fields__ if f not in _FREE_FIELDS
                and getattr(cfg, f) != getattr(model_cfg, f)]
        if diff:
            raise ValueError(f"{path}: was saved from another SST configuration ({'; '.join(diff)}); build the "
                             "model with model_from_checkpoint, or pass strict=False to load the weights anyway")
    sd = rescale_upsampler(model, sd)
    _check_fits(model, sd, path, strict)
    return model.load_state_dict(sd, strict=strict)


def load_checkpoint(model: nn.Module, path, strict: bool = True):
    """Load an official ``.pth`` or an rfsr ``.safetensors`` file into ``model``; returns ``load_state_dict``'s
    (missing_keys, unexpected_keys).

    The upsampler is resized when the file's scale differs from the model's. With ``strict``, every key must
    match, and an rfsr file's config must equal the model's apart from ``upscaling_factor`` and ``attn_backend``.
    Raises ValueError naming the file when it cannot be read or does not fit the model.
    """
    path = os.fspath(path)
    sd, meta = read_checkpoint(path)
    return _load(model, sd, meta, path, strict)


def save_checkpoint(model: SST, path, extra_metadata: dict[str, str] | None = None) -> None:
    """Write ``model``'s weights and config to ``path`` (``.safetensors``), atomically.

    ``extra_metadata``: more str → str entries for the file's metadata (e.g. the training recipe); the keys
    'format', 'format_version', 'config' and 'rfsr_version' are rfsr's own.
    """
    if not isinstance(model, SST):
        raise TypeError(f"model must be an SST (its config is stored with the weights), got {type(model).__name__}")
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"path must end with '.safetensors', got {path!r}")
    extra = dict(extra_metadata or {})
    for k, v in extra.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"extra_metadata must map str to str, got {k!r}: {type(v).__name__}")
        if k in _RESERVED_METADATA:
            raise ValueError(f"extra_metadata key {k!r} is reserved; reserved keys are {list(_RESERVED_METADATA)}")
    from .. import __version__  # at call time: the package __init__ may import this module
    metadata = {**extra, "format": FORMAT, "format_version": FORMAT_VERSION, "config": model.config.to_json(),
                "rfsr_version": __version__}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the result should have a normal file's mode
        os.replace(tmp, path)  # readers see the old file or the complete new one, never a partial write
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def infer_config_fields(state_dict: dict[str, torch.Tensor], path: str = "state_dict") -> dict:
    """The SSTConfig fields an official state dict determines: everything but ``window_sizes`` and
    ``attn_backend``. Raises ValueError when it is not an SST (RIB) state dict."""
    sd = state_dict

    def need(key: str) -> torch.Tensor:
        if key not in sd:
            raise ValueError(f"{path}: no {key!r}: not an SST checkpoint with RIB attention ({_EXPECTED})")
        return sd[key]

    dim = need("proj.weight").shape[0]
    n_blocks = 0
    while f"body.{n_blocks}.0.norm_attn.weight" in sd:
        n_blocks += 1
    n_layers = 0
    while f"body.0.{n_layers}.norm_attn.weight" in sd:
        n_layers += 1
    if not n_blocks or not n_layers:
        raise ValueError(f"{path}: no 'body.0.0.norm_attn.weight': not an SST checkpoint ({_EXPECTED})")
    to_q = [need(f"body.0.{l}.attn.to_q") for l in range(n_layers)]
    n_in = need("body.0.0.attn.to_hidden").shape[0]
    hidden = need("body.0.0.ffn.proj.weight").shape[0]
    exp_ratio = hidden / dim
    if int(dim * exp_ratio) != hidden:  # float rounding: nudge up so that int(dim * exp_ratio) == hidden
        exp_ratio = math.nextafter(exp_ratio, math.inf)
    gate = "DWC" if "body.0.0.attn.gate.1.weight" in sd else "Linear" if "body.0.0.attn.gate.0.weight" in sd \
        else None
    fields = dict(dim=dim, n_blocks=n_blocks, num_heads=[t.shape[0] for t in to_q], ranks=[t.shape[2] for t in to_q],
                  rib_hidden_dim=to_q[0].shape[1], rib_n_freqs=(n_in - 2) // 4, exp_ratio=exp_ratio,
                  attn_type="RIB", gate_type=gate, intermediate_dim=64)
    if "upsampler.feature_conv.weight" in sd:
        fields.update(upsampler_type="pixelshuffle", intermediate_dim=sd["upsampler.feature_conv.weight"].shape[0],
                      upscaling_factor=up_conv_scale("pixelshuffle", need("upsampler.up_conv.weight")))
    elif "upsampler.f.0.weight" in sd:
        stages = sum(f"upsampler.f.{3 * i + 3}.weight" in sd for i in range(8))
        fields.update(upsampler_type="nn+conv", intermediate_dim=sd["upsampler.f.0.weight"].shape[0],
                      upscaling_factor=None if stages == 1 else 2 ** stages)  # one stage: x2 or x3
    else:
        fields.update(upsampler_type="pixelshuffle_direct",
                      upscaling_factor=up_conv_scale("pixelshuffle_direct", need("upsampler.up_conv.weight")))
    return fields


def _shape_diff(fields: dict, cfg: SSTConfig) -> list[str]:
    norm = {f: tuple(v) if isinstance(v, list) else v for f, v in fields.items()}
    return [f"{f}: file {norm[f]!r} vs {getattr(cfg, f)!r}" for f in _SHAPE_FIELDS if norm[f] != getattr(cfg, f)]


def model_from_checkpoint(path, *, preset: str | None = None, **overrides) -> SST:
    """Build an SST from a checkpoint and load it (strict).

    rfsr ``.safetensors`` files carry their config. Official ``.pth`` files do not record the window sizes (RIB
    weights fit any window), so name the preset (``preset='sst_light_plus'``) or pass ``window_sizes=[...]``;
    everything else is read from the tensor shapes. ``overrides`` (SSTConfig fields) apply last, e.g.
    ``upscaling_factor=2`` (resizes the upsampler) or ``attn_backend='reference'``.
    """
    path = os.fspath(path)
    sd, meta = read_checkpoint(path)
    cfg = _file_config(meta, path)
    if cfg is not None:
        if preset is not None:
            raise ValueError(f"{path}: is an rfsr checkpoint with its own config; preset is only for official files")
        cfg = cfg.replace(**overrides)
    else:
        fields = infer_config_fields(sd, path)
        if preset is not None:
            base = get_config(preset)
            diff = _shape_diff(fields, base)
            if diff:
                raise ValueError(f"{path}: does not match preset {preset!r}: {'; '.join(diff)}")
            fields = {**base.to_dict(), "upscaling_factor": fields["upscaling_factor"]}
        elif "window_sizes" not in overrides:
            matches = [name for name, c in PRESETS.items() if not _shape_diff(fields, c)]
            hint = f"it matches the presets {matches}, which differ only in window sizes" if matches \
                else f"it matches no preset; pass the {len(fields['ranks'])} window sizes of its layers"
            raise ValueError(f"{path}: official checkpoints do not record the window sizes; pass preset=... or "
                             f"window_sizes=[...] ({hint}). Presets: {list_models()}")
        if fields["upscaling_factor"] is None and "upscaling_factor" not in overrides:
            raise ValueError(f"{path}: a one-stage 'nn+conv' upsampler can be x2 or x3; pass upscaling_factor")
        cfg = SSTConfig(**{**fields, **overrides})
    model = SST.from_config(cfg)
    _load(model, sd, None, path, strict=True)
    return model

