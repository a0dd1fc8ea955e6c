"""torch.distributed helpers: the trainers run unchanged in one process or under torchrun."""
from __future__ import annotations

import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist


# Per-step flags (a rank without a batch, a stop signal) are agreed on over gloo on the CPU: under NCCL they
# would be GPU tensors, and reading the result would make the host wait for the step in flight.
_HOST_GROUP = None


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise the process group when launched by torchrun; return (rank, world_size, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
        if use_cuda:
            global _HOST_GROUP
            _HOST_GROUP = dist.new_group(backend="gloo", timeout=timedelta(minutes=30))
    return get_rank(), get_world_size(), device


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def reduce_sum(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum scalars over ranks (counts, correct predictions)."""
    if not is_distributed() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: v for k, v in zip(keys, t.tolist())}


def reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    summed = reduce_sum(values, device)
    n = get_world_size()
    return {k: v / n for k, v in summed.items()}


def agree(flag: bool, every: bool) -> bool:
    """One flag over all ranks, on the host: whether ``every`` rank (else: any rank) holds it."""
    if not is_distributed():
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN if every else dist.ReduceOp.MAX, group=_HOST_GROUP)
    return bool(t.item())


def agree_min(value: int) -> int:
    """The smallest of an integer over all ranks, on the host."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_HOST_GROUP)
    return int(t.item())


def every_rank_has_batch(has_batch: bool) -> bool:
    """Whether every rank holds a usable batch this step (one process: ``has_batch`` itself).

    A rank whose whole batch was unreadable must not skip the step alone: under DDP its peers would
    wait in backward's gradient all-reduce for a rank that has moved on, and every collective after
    that pairs with the wrong one. So the ranks agree, and all skip the step when any rank has nothing
    (the good images of that step are dropped too; corrupt ones are counted by the caller)."""
    return agree(has_batch, every=True)


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, exchanged on the host (gloo): Python results
    (evaluation detections, per-image checks, parsed annotations, generator states) need no trip through
    GPU memory."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj, group=_HOST_GROUP)
    return out


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # DDP wrappers caught in reference cycles let go of the process group first
        dist.destroy_process_group()
