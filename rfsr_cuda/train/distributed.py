"""Multi-process (DistributedDataParallel) support for the training loop: process group set-up, data sharding,
per-rank seeds and the few collectives the loop needs.

Launch with ``torchrun --nproc_per_node=N examples/train.py ...``: torchrun sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and :func:`distributed_session` joins the process group
(NCCL on ``cuda:LOCAL_RANK``, gloo on the CPU). Without those variables, or with ``WORLD_SIZE=1``, nothing is set
up and every helper here degrades to the single-process behaviour.

Data: step ``t`` of a run with ``W`` processes of ``b`` patches each reads global sample numbers
``t·W·b + r·b + i`` (rank ``r``, ``i < b``). The ranks' shards are disjoint and their union over one step is
``[t·G, (t+1)·G)`` with the global batch ``G = W·b`` whatever ``W`` is, so a run resumed on another number of
processes with the same global batch continues the same sample sequence.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "dist_info", "distributed_session", "ShardedSampleRange", "rank_seed", "barrier",
           "all_gather_object", "broadcast_object", "all_reduce_mean", "weights_digest"]

# Validation and the export run on rank 0 while the other ranks wait in a barrier; the default NCCL timeout
# (10 min) could be too short for a large validation set.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("RFSR_DIST_TIMEOUT_MIN", "60")))


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None  # None: not distributed

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """The current process group's ranks (a single process when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())), backend=dist.get_backend())


def _env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _wants_cuda(device: str) -> bool:
    if device == "auto":
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


@contextlib.contextmanager
def distributed_session(device: str = "auto") -> Iterator[DistInfo]:
    """Join the process group that torchrun's environment describes, for the duration of the block.

    ``device`` is the training's device setting: ``auto``/``cuda`` use NCCL and ``cuda:LOCAL_RANK`` (made the
    current device), ``cpu`` uses gloo. A group that is already initialised is used as it is and left alone;
    one this call created is destroyed when the block ends, normally or by an exception. With no torchrun
    environment (or ``WORLD_SIZE=1``) this yields a single-process :class:`DistInfo` and does nothing.
    """
    if dist.is_available() and dist.is_initialized():
        yield dist_info()
        return
    if _env_world_size() <= 1:
        yield DistInfo()
        return
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = _wants_cuda(device)
    if cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but CUDA is not available")
        if device not in ("auto", "cuda"):
            raise ValueError(f"--device {device} names one GPU; under torchrun use --device cuda (or auto): "
                             f"each process takes cuda:LOCAL_RANK")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda else "gloo"
    kwargs = {"device_id": torch.device("cuda", local_rank)} if cuda else {}
    dist.init_process_group(backend=backend, timeout=DEFAULT_TIMEOUT, **kwargs)
    try:
        yield dist_info()
    finally:
        # On an exception the other ranks may be stuck in a collective; torchrun tears them down once this
        # process exits, so destroying our side of the group is all there is to do.
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


class ShardedSampleRange:
    """Sample numbers for steps ``[start_step, end_step)`` of rank ``rank``: for each step ``t`` the ``batch``
    numbers ``t·world_size·batch + rank·batch + i``. A lazy sampler (nothing is materialised), with ``len()``.

    With ``world_size=1`` this is ``range(start_step·batch, end_step·batch)``.
    """

    def __init__(self, start_step: int, end_step: int, batch: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.start_step, self.end_step = int(start_step), max(int(start_step), int(end_step))
        self.batch, self.rank, self.world_size = int(batch), int(rank), int(world_size)

    @property
    def global_batch(self) -> int:
        return self.batch * self.world_size

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * self.batch

    def __iter__(self) -> Iterator[int]:
        g, offset = self.global_batch, self.rank * self.batch
        for t in range(self.start_step, self.end_step):
            first = t * g + offset
            yield from range(first, first + self.batch)


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """A 63-bit seed for rank ``rank`` at step ``step`` of a run seeded with ``seed`` (independent streams)."""
    return int(np.random.SeedSequence([int(seed), int(rank), int(step), 0x5EED]).generate_state(2, np.uint32)
               .astype(np.uint64).dot(np.array([1 << 31, 1], dtype=np.uint64)))


def barrier() -> None:
    if dist_info().enabled:
        dist.barrier()


def all_gather_object(obj: Any) -> List[Any]:
    info = dist_info()
    if not info.enabled:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not dist_info().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """In place: the mean of ``t`` over the ranks (``t`` must be on the backend's device: CUDA for NCCL)."""
    info = dist_info()
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(info.world_size)
    return t


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (names, dtypes, shapes and bytes): equal iff the weights are bit-equal."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        v = value.detach().cpu().contiguous()
        h.update(f"{name}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
