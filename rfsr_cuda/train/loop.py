"""The training loop: L1 loss, AdamW, warm-up + cosine/multistep schedule, EMA, checkpoints that resume exactly.

Defaults follow the official SST recipe (AdamW betas (0.9, 0.9), weight decay 0, EMA 0.999, L1, linear warm-up,
multistep halving at 50/80/90/95/98 % of the steps; validation and the exported weights use the EMA model).

Checkpoints are plain ``torch.save`` dictionaries of tensors and primitive containers, so they load with
``torch.load(weights_only=True)``: model, EMA, optimiser and scheduler state dicts, the step, the Python/numpy/torch
RNG states (converted to lists and tensors), the model config and the training config. They are written to a
temporary file and renamed into place.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..image_io import atomic_write
from ..metrics import evaluate_image
from .data import HRFolderDataset, load_validation_set

__all__ = [
    "TrainConfig",
    "ModelEMA",
    "WarmupSchedule",
    "train",
    "validate",
    "save_training_state",
    "load_training_state",
    "find_latest_checkpoint",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "rfsr-train-state"
CHECKPOINT_VERSION = 1
DEFAULT_MILESTONES = (0.5, 0.8, 0.9, 0.95, 0.98)  # fractions of the run, as in the official 500k-step recipe


@dataclass
class TrainConfig:
    """Everything a run needs; the CLI in examples/train.py maps its flags onto these fields."""

    data: str  # folder of HR training images
    scale: int = 4
    preset: str = "sst_light"
    model_overrides: Dict[str, Any] = field(default_factory=dict)  # fields replacing the preset's
    val: Optional[str] = None  # folder of HR validation images (full images, LR by the same bicubic)
    out: str = "runs/sst"
    steps: int = 500_000
    batch_size: int = 16
    lr_patch: int = 64
    lr: float = 5e-4
    betas: Tuple[float, float] = (0.9, 0.9)
    weight_decay: float = 0.0
    warmup: Optional[int] = None  # None: 4 % of the steps, at most 20k (the recipe's 20k of 500k)
    schedule: str = "multistep"  # "multistep" | "cosine"
    milestones: Optional[List[int]] = None  # multistep; None: DEFAULT_MILESTONES of the steps
    gamma: float = 0.5  # multistep factor
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    ema_decay: float = 0.999  # 0 disables the EMA (the raw weights are then validated and exported)
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    amp: bool = True  # bf16 autocast on CUDA (ignored on the CPU)
    compile: bool = False  # torch.compile the training forward
    device: str = "auto"
    seed: int = 0
    num_workers: int = 4
    cache_images: bool = False  # keep decoded training images in memory (small folders)
    quantize_lr: bool = True  # round LR inputs to 8-bit levels, like benchmark LR files
    augment: bool = True
    init: Optional[str] = None  # weights to start from (e.g. the x2 model for x3; the upsampler is resized)
    # a checkpoint path, or "auto" for the newest in out/checkpoints (none there: start fresh). A resumed run takes
    # its model config and weights from the checkpoint; preset, model_overrides and init are then not used.
    resume: Optional[str] = None
    val_every: int = 5000
    save_every: int = 5000
    keep_checkpoints: int = 3  # periodic checkpoints kept (0 keeps all)
    log_every: int = 100
    progress: bool = True
    export: bool = True  # write the EMA weights as rfsr safetensors at the end

    def resolved_warmup(self) -> int:
        if self.warmup is not None:
            return int(self.warmup)
        return min(20_000, self.steps // 25)

    def resolved_milestones(self) -> List[int]:
        if self.milestones is not None:
            return sorted(int(m) for m in self.milestones)
        return [int(round(f * self.steps)) for f in DEFAULT_MILESTONES]


class WarmupSchedule:
    """LR factor for step ``t`` (0-based): linear warm-up ``(t + 1) / warmup``, then multistep or cosine decay.

    Used through ``torch.optim.lr_scheduler.LambdaLR``; its attributes are primitives, so the scheduler's state dict
    (which stores them) stays loadable with ``weights_only=True``.
    """

    def __init__(self, total_steps: int, warmup: int, kind: str = "multistep", milestones: Sequence[int] = (),
                 gamma: float = 0.5, min_ratio: float = 0.0):
        if kind not in ("multistep", "cosine"):
            raise ValueError(f"unknown schedule {kind!r}: use 'multistep' or 'cosine'")
        self.total_steps = int(total_steps)
        self.warmup = max(0, int(warmup))
        self.kind = kind
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)
        self.min_ratio = float(min_ratio)

    def __call__(self, t: int) -> float:
        factor = 1.0
        if t < self.warmup:
            factor = (t + 1) / self.warmup
        if self.kind == "multistep":
            return factor * self.gamma ** sum(1 for m in self.milestones if t >= m)
        span = max(1, self.total_steps - self.warmup)
        progress = min(1.0, max(0.0, (t - self.warmup) / span))
        return factor * (self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class ModelEMA:
    """Exponential moving average of a model's weights: ``ema = decay·ema + (1 − decay)·weights`` after each step.

    Floating-point parameters are averaged; buffers are copied. The averaged copy is ``.module`` (eval mode, no grad).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        import copy

        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        w = 1.0 - self.decay
        for e, p in zip(self.module.parameters(), model.parameters()):
            if e.dtype.is_floating_point:
                e.lerp_(p.detach(), w)
            else:
                e.copy_(p)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


# ------------------------------------------------------------------------------------------------------------------
# model construction (the model layer owns the architecture; this only calls it)

def _models():
    from .. import models

    return models


def _config_dict(model: nn.Module) -> Dict[str, Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise TypeError("the model has no .config; build it with rfsr_cuda.models")
    return json.loads(json.dumps(cfg.to_dict()))  # primitives only (lists, not tuples)


def build_model(cfg: TrainConfig) -> nn.Module:
    overrides = dict(cfg.model_overrides)
    overrides.pop("upscaling_factor", None)
    return _models().create_model(cfg.preset, upscaling_factor=cfg.scale, **overrides)


def _model_from_config(config: Dict[str, Any]) -> nn.Module:
    m = _models()
    return m.SST.from_config(m.SSTConfig(**config))


# ------------------------------------------------------------------------------------------------------------------
# RNG state as weights_only-safe values

def _rng_state() -> Dict[str, Any]:
    py = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ------------------------------------------------------------------------------------------------------------------
# checkpoints

_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


def find_latest_checkpoint(out_dir: os.PathLike) -> Optional[Path]:
    """The checkpoint with the highest step in ``out_dir/checkpoints``, or None."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    best = None
    for p in folder.iterdir():
        m = _STEP_RE.match(p.name)
        if m and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), p)
    return best[1] if best else None


def save_training_state(path: os.PathLike, state: Dict[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: os.PathLike) -> Dict[str, Any]:
    """Load a checkpoint written by :func:`train` (``weights_only=True``: no code runs while loading)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an rfsr training checkpoint")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"{path} was written by a newer rfsr (checkpoint version {state['version']})")
    return state


def _primitive_config(cfg: TrainConfig) -> Dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# ------------------------------------------------------------------------------------------------------------------
# validation

@torch.inference_mode()
def validate(model: nn.Module, items, scale: int, device: torch.device, amp: bool = True) -> Dict[str, Any]:
    """Mean PSNR-Y/SSIM-Y (crop = scale) of ``model`` on ``[(name, lr, hr), ...]``, one whole image at a time."""
    was_training = model.training
    model.eval()
    per_image = {}
    use_amp = amp and device.type == "cuda"
    for name, lr, hr in items:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            sr = model(lr.unsqueeze(0).to(device))
        sr = sr.float().clamp_(0, 1)[0].cpu()
        per_image[name] = evaluate_image(sr, hr, scale)
    model.train(was_training)
    psnr = float(np.mean([v["psnr"] for v in per_image.values()]))
    ssim = float(np.mean([v["ssim"] for v in per_image.values()]))
    return {"psnr": psnr, "ssim": ssim, "images": len(per_image), "per_image": per_image}


# ------------------------------------------------------------------------------------------------------------------
# the loop

def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but CUDA is not available")
    return dev


def _log(out: Path, record: Dict[str, Any]) -> None:
    with open(out / "train_log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _due(step: int, every: int, last: int) -> bool:
    """Every ``every`` steps and at the last one; ``every <= 0`` means at the last step only."""
    return step == last or (every > 0 and step % every == 0)


def _check_config(cfg: TrainConfig) -> None:
    for name in ("scale", "batch_size", "lr_patch"):
        if int(getattr(cfg, name)) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.steps < 0:
        raise ValueError(f"steps must be >= 0, got {cfg.steps}")
    if not cfg.lr > 0:
        raise ValueError(f"lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) training as ``cfg`` says. Returns a summary dict:

    ``step``, ``losses`` ([(step, mean L1 over the last log window)]), ``val`` (last validation or None),
    ``checkpoint`` (path of the last checkpoint), ``export`` (path of the safetensors export or None), ``seconds``.
    """
    t_start = time.time()
    _check_config(cfg)
    device = _resolve_device(cfg.device)
    out = Path(cfg.out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)

    resume_path = None
    if cfg.resume:
        resume_path = find_latest_checkpoint(out) if cfg.resume == "auto" else Path(cfg.resume)
        if cfg.resume != "auto" and not resume_path.is_file():
            raise FileNotFoundError(f"no checkpoint at {resume_path}")
    state = load_training_state(resume_path) if resume_path else None

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    if state is not None:
        if int(state["model_config"].get("upscaling_factor", cfg.scale)) != cfg.scale:
            raise ValueError(f"the checkpoint is a x{state['model_config']['upscaling_factor']} model, "
                             f"not x{cfg.scale}")
        model = _model_from_config(state["model_config"])
    else:
        model = build_model(cfg)
        if cfg.init:
            _models().load_checkpoint(model, cfg.init)
    model.to(device).train()
    model_config = _config_dict(model)

    ema = ModelEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                  weight_decay=cfg.weight_decay)
    schedule = WarmupSchedule(cfg.steps, cfg.resolved_warmup(), cfg.schedule, cfg.resolved_milestones(),
                              cfg.gamma, cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    step = 0
    if state is not None:
        model.load_state_dict(state["model"])
        if ema is not None:
            ema.load_state_dict(state["ema"] if state.get("ema") is not None else state["model"])
        optimizer.load_state_dict(state["optimizer"])
        # the step count and base lr come from the checkpoint; the schedule's shape follows cfg (so a run can be
        # extended with a larger --steps), which for unchanged settings is the saved one
        sched_state = dict(state["scheduler"])
        sched_state["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
        scheduler.load_state_dict(sched_state)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * schedule(scheduler.last_epoch)
        step = int(state["step"])
        _set_rng_state(state["rng"])
    del state

    dataset = HRFolderDataset(cfg.data, cfg.scale, cfg.lr_patch, augment=cfg.augment, quantize_lr=cfg.quantize_lr,
                              seed=cfg.seed, cache=cfg.cache_images)
    val_items = load_validation_set(cfg.val, cfg.scale, quantize_lr=cfg.quantize_lr) if cfg.val else None
    # sample numbers, not shuffled indices: the dataset maps each to an image and a crop deterministically
    sampler = range(step * cfg.batch_size, cfg.steps * cfg.batch_size)
    # its own generator, so creating the loader does not draw from the global RNG (the saved state stays exact)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=cfg.num_workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed + step))

    forward = torch.compile(model) if cfg.compile else model
    use_amp = cfg.amp and device.type == "cuda"
    eval_model = ema.module if ema is not None else model

    def checkpoint(at_step: int) -> Path:
        path = out / "checkpoints" / f"step_{at_step:08d}.pt"
        save_training_state(path, {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": at_step,
            "preset": cfg.preset,
            "scale": cfg.scale,
            "model_config": model_config,
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
            "train_config": _primitive_config(cfg),
        })
        if cfg.keep_checkpoints > 0:
            old = sorted(p for p in path.parent.iterdir() if _STEP_RE.match(p.name))
            for p in old[: -cfg.keep_checkpoints]:
                p.unlink()
        return path

    losses: List[Tuple[int, float]] = []
    val_result = None
    last_ckpt = None
    window_sum = torch.zeros((), device=device)
    window_n = 0
    bar = tqdm(total=cfg.steps, initial=step, disable=not cfg.progress, dynamic_ncols=True, desc="train")
    for lr_img, hr_img in loader:
        lr_img = lr_img.to(device, non_blocking=True)
        hr_img = hr_img.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            sr = forward(lr_img)
        loss = torch.nn.functional.l1_loss(sr.float(), hr_img)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(model)
        step += 1
        bar.update(1)
        window_sum += loss.detach()
        window_n += 1

        if _due(step, cfg.log_every, cfg.steps):
            mean_loss = float(window_sum) / window_n
            window_sum.zero_()
            window_n = 0
            if not math.isfinite(mean_loss):
                bar.close()
                raise FloatingPointError(f"loss is {mean_loss} at step {step}; the last good checkpoint is "
                                         f"{last_ckpt or 'not written yet'}")
            lr_now = scheduler.get_last_lr()[0]
            losses.append((step, mean_loss))
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr_now:.2e}")
            _log(out, {"step": step, "loss": mean_loss, "lr": lr_now})
        if val_items and _due(step, cfg.val_every, cfg.steps):
            val_result = validate(eval_model, val_items, cfg.scale, device, cfg.amp)
            bar.write(f"step {step}: val PSNR-Y {val_result['psnr']:.3f} dB, SSIM-Y {val_result['ssim']:.4f} "
                      f"({val_result['images']} images)")
            _log(out, {"step": step, "val_psnr": val_result["psnr"], "val_ssim": val_result["ssim"]})
        if _due(step, cfg.save_every, cfg.steps):
            last_ckpt = checkpoint(step)
    bar.close()
    if last_ckpt is None and step > 0:  # nothing left to run (resumed at the end): keep the path for the summary
        last_ckpt = find_latest_checkpoint(out)

    export_path = None
    if cfg.export:
        export_path = out / f"{cfg.preset}_x{cfg.scale}.safetensors"
        meta = {"step": str(step), "ema_decay": str(cfg.ema_decay if ema is not None else 0.0)}
        if val_result is not None:
            meta.update(val_psnr_y=f"{val_result['psnr']:.4f}", val_ssim_y=f"{val_result['ssim']:.6f}")
        export_model = ema.module if ema is not None else model
        _save_export(export_model, export_path, meta)

    return {
        "step": step,
        "losses": losses,
        "val": val_result,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "export": str(export_path) if export_path else None,
        "seconds": time.time() - t_start,
    }


def _save_export(model: nn.Module, path: Path, meta: Dict[str, str]) -> None:
    """Write the weights and config as an rfsr safetensors file (the model layer's writer is atomic)."""
    _models().save_checkpoint(model, path, extra_metadata=meta)
