"""Distillation on several processes (torchrun) with DistributedDataParallel, through s3prl's own runner.

`torchrun --nproc-per-node N --no-python s3prl-ekd pretrain ...` starts N copies of the command;
each finds itself here (torchrun's RANK / WORLD_SIZE / LOCAL_RANK) and:
- joins the process group (NCCL on GPUs, one GPU per process; gloo on CPU), with a timeout, so a
  collective never waits forever on a rank that died;
- wraps the student in DDP (gradients averaged) and scales its loss so that the averaged gradient
  equals the one-process gradient of the whole batch, even when the ranks hold different numbers
  of valid frames;
- reads its part of every batch: the batches are those of one process with the same
  `train_batch_size` (length buckets in a per-epoch order drawn from the seed), and rank r takes
  utterances r, r + N, ... of each, so the effective batch, the learning-rate schedule and
  `total_steps` mean what they mean for one process; resuming (also with another N) continues
  at the exact batch where the checkpoint was taken;
- leaves checkpoints, tensorboard logs, progress bars and config copies to rank 0 (plugin/runner.py,
  with s3prl_ekd.patches.quiet_ranks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
from torch.utils.data import Sampler

from s3prl_ekd.errors import ConfigError

TIMEOUT_ENV = "S3PRL_EKD_DIST_TIMEOUT"  # seconds a collective may wait (default 600)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int

    @property
    def leader(self) -> bool:
        return self.rank == 0


def from_env() -> DistContext | None:
    """The torchrun context of this process, or None when not started by torchrun."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))


def current() -> DistContext | None:
    """The context once the process group is up (None in a plain one-process run)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    return from_env() or DistContext(torch.distributed.get_rank(), torch.distributed.get_world_size(), 0)


def init(context: DistContext, device: str) -> str:
    """Join the process group; returns the backend. CUDA: one GPU per local rank."""
    cuda = device.startswith("cuda")
    if cuda:
        if torch.cuda.device_count() <= context.local_rank:
            raise ConfigError(f"rank {context.rank}: LOCAL_RANK {context.local_rank} but {torch.cuda.device_count()} "
                              "GPU(s) visible; start at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(context.local_rank)
    backend = "nccl" if cuda else "gloo"
    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 600)))
    torch.distributed.init_process_group(backend, timeout=timeout)
    return backend


def leave() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def per_rank_batch(batch_size: int, context: DistContext) -> int:
    if batch_size % context.world_size:
        raise ConfigError(f"pretrain_expert.datarc.train_batch_size: {batch_size} does not split over "
                          f"{context.world_size} processes; use a multiple of {context.world_size} (it is the "
                          "batch of all processes together)")
    return batch_size // context.world_size


class EpochBuckets(Sampler):
    """Bucket indices in a per-epoch order drawn from `seed` alone (the same on every rank and for any
    number of ranks), starting at batch `start` (counted from the first epoch): exact resumption."""

    def __init__(self, buckets: int, seed: int, start: int = 0):
        self.buckets, self.seed, self.start = buckets, seed, start

    def order(self, epoch: int) -> list[int]:
        return torch.randperm(self.buckets, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.buckets)
        self.start += self.buckets - offset  # the next iteration (s3prl's next epoch) starts at the next epoch
        return iter(self.order(epoch)[offset:])

    def __len__(self) -> int:
        return self.buckets


def loss_scale(frames: torch.Tensor, context: DistContext) -> torch.Tensor:
    """world_size * local frames / all frames: DDP averages gradients over ranks, so the scaled local
    losses (each a mean over its own frames) average to the mean over all frames of the batch."""
    total = frames.detach().clone().float()
    torch.distributed.all_reduce(total)
    return context.world_size * frames.float() / total.clamp(min=1)
