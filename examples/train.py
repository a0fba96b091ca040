"""Train an SST model on a folder of HR images (LR made on the fly with MATLAB-compatible bicubic).

    # SST-light x2 from scratch, the official recipe's optimiser settings (long!)
    python examples/train.py --preset sst_light --scale 2 --data DIV2K_train_HR --val Set5 --out runs/light_x2
    # x3 from the x2 EMA weights, half the learning rate and steps
    python examples/train.py --preset sst_light --scale 3 --data DIV2K_train_HR --init runs/light_x2/sst_light_x2.safetensors \
        --lr 2.5e-4 --steps 250000 --out runs/light_x3
    # pick up where an interrupted run stopped
    python examples/train.py ... --out runs/light_x2 --resume
    # several GPUs of one machine (DistributedDataParallel, one process per GPU): --batch-size is per GPU, so this
    # is the recipe's global batch of 16 on 2 GPUs
    torchrun --standalone --nproc_per_node=2 examples/train.py --preset sst_light --scale 2 --batch-size 8 \
        --data DIV2K_train_HR --val Set5 --out runs/light_x2

Writes OUT/checkpoints/step_*.pt (full training state), OUT/train_log.jsonl and, at the end, the EMA weights as
OUT/{preset}_x{scale}.safetensors (loadable by examples/upscale.py --weights).

Under torchrun each process trains on cuda:LOCAL_RANK (NCCL; gloo with --device cpu) and reads its own shard of
the sample stream (global sample t*G + rank*b + i at step t, G = b * WORLD_SIZE). Rank 0 alone prints, logs,
validates, writes checkpoints and exports. A checkpoint resumes on any number of processes (--resume); with the
same global batch the sample sequence continues exactly, otherwise a warning says so (the lr is not rescaled).
The log's "images_per_s" is the global training throughput (validation and checkpoints excluded).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rfsr_cuda.models import list_models
from rfsr_cuda.train import TrainConfig, train


def _model_config(text: str) -> dict:
    """JSON object, or a path to a .json file holding one."""
    p = Path(text)
    raw = p.read_text() if not text.lstrip().startswith("{") and p.is_file() else text
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not a JSON object or a JSON file: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object of model fields")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except empty ones (None, False, {}) whose help text says what happens."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == {}:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(data="")
    p = argparse.ArgumentParser(prog="train.py", description="Train SST (L1, AdamW, EMA) on a folder of HR images.",
                                formatter_class=_HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=d.preset, choices=list_models(), metavar="NAME",
                   help=f"model preset: {', '.join(list_models())}")
    g.add_argument("--scale", type=int, default=d.scale, help="upscaling factor")
    g.add_argument("--model-config", type=_model_config, default={}, metavar="JSON",
                   help='preset fields to override, as a JSON object or a .json file, e.g. \'{"n_blocks": 2}\'')
    g.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="start from these weights (rfsr .safetensors or official .pth); another scale's weights "
                        "are fine, the upsampler is resized")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="folder of HR training images (searched recursively)")
    g.add_argument("--val", default=None, help="folder of HR validation images (PSNR-Y/SSIM-Y, crop = scale)")
    g.add_argument("--lr-patch", type=int, default=d.lr_patch, help="LR patch side; HR crops are scale times larger")
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="patches per step and process (under torchrun: per GPU; the global batch is this times "
                        "WORLD_SIZE)")
    g.add_argument("--num-workers", type=int, default=d.num_workers,
                   help="data loader processes (per training process)")
    g.add_argument("--cache-images", action="store_true", help="keep decoded training images in memory")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=d.steps, help="total optimiser steps")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (the recipe: 5e-4 for x2 from "
                                                           "scratch, 2.5e-4 when starting from --init)")
    g.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default: 4%% of --steps, "
                                                            "at most 20000)")
    g.add_argument("--schedule", choices=["multistep", "cosine"], default=d.schedule,
                   help="decay after the warm-up")
    g.add_argument("--milestones", type=int, nargs="+", default=None,
                   help="multistep: steps where the lr is multiplied by --gamma (default: 50/80/90/95/98%% of "
                        "--steps)")
    g.add_argument("--gamma", type=float, default=d.gamma, help="multistep factor")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="cosine: final lr / peak lr")
    g.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA decay; 0 disables the EMA")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm; 0 = off")
    g.add_argument("--no-amp", action="store_true", help="train in float32 on CUDA (default: bf16 autocast)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model for training")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=d.out, help="output folder: checkpoints, log, exported weights")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH|auto",
                   help="continue from a checkpoint; 'auto' (or the bare flag) takes the newest in OUT/checkpoints "
                        "and starts fresh if there is none")
    g.add_argument("--device", default=d.device,
                   help="auto, cpu, cuda or cuda:N (under torchrun: auto or cuda = cuda:LOCAL_RANK with NCCL, "
                        "cpu = gloo)")
    g.add_argument("--seed", type=int, default=d.seed, help="seeds the model init and the data order/crops")
    g.add_argument("--val-every", type=int, default=d.val_every, help="validate every N steps (and at the end)")
    g.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="periodic checkpoints kept; 0 = all")
    g.add_argument("--log-every", type=int, default=d.log_every, help="average and log the loss every N steps")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop after this long (checked at log points), checkpoint and export; --resume continues")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        data=args.data, scale=args.scale, preset=args.preset, model_overrides=args.model_config, val=args.val,
        out=args.out, steps=args.steps, batch_size=args.batch_size, lr_patch=args.lr_patch, lr=args.lr,
        warmup=args.warmup, schedule=args.schedule, milestones=args.milestones, gamma=args.gamma,
        min_lr_ratio=args.min_lr_ratio, ema_decay=args.ema_decay, grad_clip=args.grad_clip, amp=not args.no_amp,
        compile=args.compile, device=args.device, seed=args.seed, num_workers=args.num_workers,
        cache_images=args.cache_images, init=args.init, resume=args.resume, val_every=args.val_every,
        save_every=args.save_every, keep_checkpoints=args.keep_checkpoints, log_every=args.log_every,
        progress=not args.no_progress, time_limit=args.time_limit,
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    result = train(config_from_args(args))
    if result["rank"] != 0:  # rank 0 reports for the whole run
        return 0
    parts = [f"done: step {result['step']}/{args.steps} in {result['seconds']:.1f} s"]
    if result["world_size"] > 1:
        parts.append(f"{result['world_size']} processes, global batch {result['global_batch']}")
    if result["images_per_s"]:
        parts.append(f"{result['images_per_s']:.1f} images/s")
    if result["losses"]:
        parts.append(f"L1 {result['losses'][-1][1]:.5f}")
    if result["val"]:
        v = result["val"]
        parts.append(f"val PSNR-Y {v['psnr']:.3f} dB SSIM-Y {v['ssim']:.4f} ({v['images']} images)")
    if result["checkpoint"]:
        parts.append(f"checkpoint {result['checkpoint']}")
    if result["export"]:
        parts.append(f"weights {result['export']}")
    print("; ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
