"""The training loop: L1 loss, AdamW, warm-up + cosine/multistep schedule, EMA, checkpoints that resume exactly.

Defaults follow the official SST recipe (AdamW betas (0.9, 0.9), weight decay 0, EMA 0.999, L1, linear warm-up,
multistep halving at 50/80/90/95/98 % of the steps; validation and the exported weights use the EMA model).

Checkpoints are plain ``torch.save`` dictionaries of tensors and primitive containers, so they load with
``torch.load(weights_only=True)``: model, EMA, optimiser and scheduler state dicts, the step, the Python/numpy/torch
RNG states (converted to lists and tensors), the model config and the training config. They are written to a
temporary file and renamed into place.

Multi-process training (``torchrun --nproc_per_node=N examples/train.py ...``, see :mod:`.distributed`): the model
is wrapped in DistributedDataParallel, ``batch_size`` is per process (the global batch is N times larger), each
rank reads its own shard of the sample stream, and rank 0 alone keeps the EMA, logs, validates, writes checkpoints
and exports while the other ranks wait at barriers. A checkpoint also records the world size, the per-process and
global batch and every rank's RNG state; it resumes on any number of processes. At each checkpoint the ranks
compare SHA-256 digests of their weights (logged as ``weights_sha256``) and stop if the replicas differ. With the
environment variable ``RFSR_TRAIN_DEBUG_DIR`` set, every rank writes ``rank{R}.json`` there at the end (digests
of its first 16 batches' HR patches and of its final weights), for tests.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
import time
import warnings
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
from .distributed import (DistInfo, ShardedSampleRange, all_gather_object, all_reduce_mean, barrier,
                          broadcast_object, distributed_session, rank_seed, weights_digest)

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
    batch_size: int = 16  # per process: under torchrun the global batch is WORLD_SIZE times larger
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
    # stop early, checkpoint and export once this many seconds of the run have passed (checked at log points);
    # the schedule keeps its length, so a resumed run continues it. None: no limit.
    time_limit: Optional[float] = None

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


def _rank_rng_state(device: torch.device) -> Dict[str, Any]:
    """One process's RNG state for a distributed checkpoint (CUDA: its own device's generator only)."""
    state = _rng_state()
    state.pop("cuda", None)
    if device.type == "cuda":
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def _set_rank_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    _set_rng_state({k: v for k, v in state.items() if k != "cuda_device"})
    if device.type == "cuda" and "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _saved_layout(state: Dict[str, Any]) -> Tuple[int, int, int]:
    """(world size, batch per process, global batch) of the run that wrote ``state`` (older ones: 1 process)."""
    world = int(state.get("world_size", 1))
    batch = int(state.get("batch_size", state.get("train_config", {}).get("batch_size", 0)))
    return world, batch, int(state.get("global_batch", world * batch))


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) training as ``cfg`` says. Returns a summary dict:

    ``step``, ``losses`` ([(step, mean L1 over the last log window, averaged over the ranks)]), ``val`` (last
    validation or None), ``checkpoint`` (path of the last checkpoint), ``export`` (path of the safetensors export or
    None), ``seconds``, ``images_per_s`` (global training throughput, validation and checkpoints excluded),
    ``rank``, ``world_size``, ``global_batch``. ``val`` and ``export`` are None on ranks other than 0.

    Under torchrun (``WORLD_SIZE > 1`` in the environment) this joins the process group for the duration of the
    call (or uses one the caller initialised); see :mod:`rfsr_cuda.train.distributed`.
    """
    with distributed_session(cfg.device) as info:
        return _train(cfg, info)


def _train(cfg: TrainConfig, info: DistInfo) -> Dict[str, Any]:
    t_start = time.time()
    _check_config(cfg)
    if info.enabled:
        device = torch.device("cuda", info.local_rank) if info.backend == "nccl" else torch.device("cpu")
    else:
        device = _resolve_device(cfg.device)
    main = info.is_main
    world = info.world_size
    global_batch = cfg.batch_size * world
    out = Path(cfg.out)
    if main:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)

    def say(text: str, **record: Any) -> None:
        """A line for the console and (with ``record``) the log, from rank 0."""
        if main:
            tqdm.write(text)
            if record:
                _log(out, record)

    resume_path = None
    if cfg.resume:
        if cfg.resume == "auto":  # rank 0 decides, so every rank loads the same file
            found = find_latest_checkpoint(out) if main else None
            resume_path = broadcast_object(str(found) if found else None)
            resume_path = Path(resume_path) if resume_path else None
        else:
            resume_path = Path(cfg.resume)
            if not resume_path.is_file():
                raise FileNotFoundError(f"no checkpoint at {resume_path}")
    state = load_training_state(resume_path) if resume_path else None

    # the same seed on every rank: identical initial weights (DDP would broadcast rank 0's anyway)
    _seed_everything(cfg.seed)

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

    # the EMA lives on rank 0 only: after each synchronised step all ranks hold the same weights
    ema = ModelEMA(model, cfg.ema_decay) if cfg.ema_decay > 0 and main else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                  weight_decay=cfg.weight_decay)
    schedule = WarmupSchedule(cfg.steps, cfg.resolved_warmup(), cfg.schedule, cfg.resolved_milestones(),
                              cfg.gamma, cfg.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    step = 0
    if state is None:
        if info.rank > 0:  # rank 0 keeps the plain seed (a one-process run is unchanged); the others their own
            _seed_everything(rank_seed(cfg.seed, info.rank, 0))
    else:
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
        saved_world, saved_batch, saved_global = _saved_layout(state)
        rank_states = state.get("rng_ranks")
        if saved_world == world and world > 1 and rank_states and len(rank_states) == world:
            _set_rank_rng_state(rank_states[info.rank], device)  # the exact state each rank had
        elif main:
            _set_rng_state(state["rng"])
        else:  # no saved state for this rank: derived from (seed, rank, step)
            _seed_everything(rank_seed(cfg.seed, info.rank, step))
        if saved_world != world or saved_batch != cfg.batch_size:
            say(f"resuming step {step} of a {saved_world}-process run (batch {saved_batch} per process, global "
                f"{saved_global}) on {world} process{'es' if world > 1 else ''} (batch {cfg.batch_size} per "
                f"process, global {global_batch})",
                event="resume_layout_change", step=step, saved_world_size=saved_world,
                saved_batch_size=saved_batch, saved_global_batch=saved_global, world_size=world,
                batch_size=cfg.batch_size, global_batch=global_batch)
        if saved_global != global_batch and main:
            msg = (f"the global batch changed from {saved_global} to {global_batch}: training continues from step "
                   f"{step} with samples {step * global_batch}+ (not the saved run's sequence), the learning rate "
                   f"schedule continues by step and is not rescaled")
            warnings.warn(msg, stacklevel=2)
            say(f"warning: {msg}", event="warning", step=step, message=msg)
    del state

    dataset = HRFolderDataset(cfg.data, cfg.scale, cfg.lr_patch, augment=cfg.augment, quantize_lr=cfg.quantize_lr,
                              seed=cfg.seed, cache=cfg.cache_images)
    val_items = load_validation_set(cfg.val, cfg.scale, quantize_lr=cfg.quantize_lr) if cfg.val and main else None
    # sample numbers, not shuffled indices: the dataset maps each to an image and a crop deterministically. Step t
    # of rank r reads t·global_batch + r·batch + i: disjoint shards whose union does not depend on the world size
    sampler = ShardedSampleRange(step, cfg.steps, cfg.batch_size, info.rank, world)
    # its own generator, so creating the loader does not draw from the global RNG (the saved state stays exact)
    loader_seed = cfg.seed + step if info.rank == 0 else rank_seed(cfg.seed, info.rank, step)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=cfg.num_workers > 0,
                        generator=torch.Generator().manual_seed(loader_seed))

    train_model: nn.Module = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # every parameter gets a gradient each step (the RIB factors are recomputed from their parameters in
        # training mode, never cached), so find_unused_parameters stays off; SST has no buffers (no BatchNorm), so
        # there is nothing for DDP to broadcast per forward. Gradients live in the all-reduce buckets (no copy of
        # each of the ~800 gradients into its bucket per step, and no second copy of them in memory)
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              gradient_as_bucket_view=True)
    forward = torch.compile(train_model) if cfg.compile else train_model
    use_amp = cfg.amp and device.type == "cuda"
    eval_model = ema.module if ema is not None else model
    say(f"training {cfg.preset} x{cfg.scale} on {world} process{'es' if world > 1 else ''} "
        f"({f'{info.backend}, {device.type}' if world > 1 else device}): batch {cfg.batch_size} per process, "
        f"global batch {global_batch}; steps {step} -> {cfg.steps}",
        event="start", step=step, world_size=world, backend=info.backend, device=device.type,
        batch_size=cfg.batch_size, global_batch=global_batch, steps=cfg.steps)

    debug_dir = os.environ.get("RFSR_TRAIN_DEBUG_DIR")  # tests: per-rank sample digests and final weights
    debug_batches: List[List[str]] = []

    def checkpoint(at_step: int) -> Path:
        path = out / "checkpoints" / f"step_{at_step:08d}.pt"
        per_rank = None
        if info.enabled:  # every rank: its RNG state, and a digest proving the replicas are still identical
            per_rank = all_gather_object({"rng": _rank_rng_state(device), "digest": weights_digest(model)})
        if main:
            save_training_state(path, {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "step": at_step,
                "preset": cfg.preset,
                "scale": cfg.scale,
                "model_config": model_config,
                "model": model.state_dict(),  # the bare model: no DDP "module." prefix
                "ema": ema.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
                "rng_ranks": [r["rng"] for r in per_rank] if per_rank else None,
                "world_size": world,
                "batch_size": cfg.batch_size,
                "global_batch": global_batch,
                "train_config": _primitive_config(cfg),
            })
            if cfg.keep_checkpoints > 0:
                old = sorted(p for p in path.parent.iterdir() if _STEP_RE.match(p.name))
                for p in old[: -cfg.keep_checkpoints]:
                    p.unlink()
        if per_rank:
            digests = [r["digest"] for r in per_rank]
            if main:
                _log(out, {"step": at_step, "event": "checkpoint", "weights_sha256": digests})
            if len(set(digests)) != 1:
                raise RuntimeError(f"step {at_step}: the DDP replicas' weights differ across ranks "
                                   f"({digests}); the checkpoint holds rank 0's")
            barrier()  # the file exists for every rank before any goes on
        return path

    losses: List[Tuple[int, float]] = []
    val_result = None
    last_ckpt = None
    window_sum = torch.zeros((), device=device)
    window_n = 0
    timed_steps = 0  # steps since the throughput clock was (re)started
    train_seconds = 0.0
    trained_steps = 0
    t_clock = t_run = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, disable=not (cfg.progress and main), dynamic_ncols=True, desc="train")
    try:
        for lr_img, hr_img in loader:
            if debug_dir and len(debug_batches) < 16:
                debug_batches.append([hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16] for x in hr_img])
            lr_img = lr_img.to(device, non_blocking=True)
            hr_img = hr_img.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                sr = forward(lr_img)
            loss = torch.nn.functional.l1_loss(sr.float(), hr_img)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # DDP averages the gradients over the ranks here
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
            timed_steps += 1

            if _due(step, cfg.log_every, cfg.steps):
                all_reduce_mean(window_sum)  # the global mean loss: every rank sees (and checks) the same value
                mean_loss = float(window_sum) / window_n
                window_sum.zero_()
                window_n = 0
                elapsed = time.perf_counter() - t_clock  # float() above waited for the device
                images_per_s = timed_steps * global_batch / max(elapsed, 1e-9)
                train_seconds += elapsed
                trained_steps += timed_steps
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(f"loss is {mean_loss} at step {step}; the last good checkpoint is "
                                             f"{last_ckpt or 'not written yet'}")
                lr_now = scheduler.get_last_lr()[0]
                losses.append((step, mean_loss))
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr_now:.2e}", img_s=f"{images_per_s:.1f}")
                if main:
                    _log(out, {"step": step, "loss": mean_loss, "lr": lr_now, "images_per_s": images_per_s})
                timed_steps, t_clock = 0, time.perf_counter()
            out_of_time = False
            if cfg.time_limit is not None and _due(step, cfg.log_every, cfg.steps) and step < cfg.steps:
                out_of_time = broadcast_object(time.perf_counter() - t_run > cfg.time_limit)  # rank 0 decides
                if out_of_time and main:
                    bar.write(f"time limit of {cfg.time_limit:.0f} s reached at step {step}: saving and exporting")
                    _log(out, {"step": step, "event": "time_limit"})
            val_due = bool(cfg.val) and (_due(step, cfg.val_every, cfg.steps) or out_of_time)
            save_due = _due(step, cfg.save_every, cfg.steps) or out_of_time
            if (val_due or save_due) and timed_steps:  # stop the throughput clock: these do not count
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                train_seconds += time.perf_counter() - t_clock
                trained_steps += timed_steps
                timed_steps = 0
            if val_due:
                if main:
                    val_result = validate(eval_model, val_items, cfg.scale, device, cfg.amp)
                    bar.write(f"step {step}: val PSNR-Y {val_result['psnr']:.3f} dB, SSIM-Y "
                              f"{val_result['ssim']:.4f} ({val_result['images']} images)")
                    _log(out, {"step": step, "val_psnr": val_result["psnr"], "val_ssim": val_result["ssim"]})
                barrier()  # the other ranks wait for rank 0's validation
            if save_due:
                last_ckpt = checkpoint(step)
            if val_due or save_due:
                t_clock = time.perf_counter()
            if out_of_time:
                break
    finally:
        bar.close()
    if last_ckpt is None and step > 0 and main:  # nothing left to run (resumed at the end): keep the path
        last_ckpt = find_latest_checkpoint(out)

    export_path = None
    if cfg.export and main:
        export_path = out / f"{cfg.preset}_x{cfg.scale}.safetensors"
        meta = {"step": str(step), "ema_decay": str(cfg.ema_decay if ema is not None else 0.0)}
        if val_result is not None:
            meta.update(val_psnr_y=f"{val_result['psnr']:.4f}", val_ssim_y=f"{val_result['ssim']:.6f}")
        export_model = ema.module if ema is not None else model
        _save_export(export_model, export_path, meta)
    if debug_dir:
        Path(debug_dir).mkdir(parents=True, exist_ok=True)
        (Path(debug_dir) / f"rank{info.rank}.json").write_text(json.dumps({
            "rank": info.rank, "world_size": world, "step": step, "batches": debug_batches,
            "weights_sha256": weights_digest(model)}))
    barrier()  # the other ranks return once rank 0's export is written
    images_per_s = trained_steps * global_batch / train_seconds if train_seconds > 0 else None
    if main and trained_steps:
        _log(out, {"step": step, "event": "end", "images_per_s": images_per_s, "world_size": world,
                   "global_batch": global_batch, "train_seconds": train_seconds})

    return {
        "step": step,
        "losses": losses,
        "val": val_result,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "export": str(export_path) if export_path else None,
        "seconds": time.time() - t_start,
        "images_per_s": images_per_s,
        "rank": info.rank,
        "world_size": world,
        "global_batch": global_batch,
    }


def _save_export(model: nn.Module, path: Path, meta: Dict[str, str]) -> None:
    """Write the weights and config as an rfsr safetensors file (the model layer's writer is atomic)."""
    _models().save_checkpoint(model, path, extra_metadata=meta)
