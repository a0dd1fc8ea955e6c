"""What the solver settings mean for a run of any size: one batch-size convention, one learning-rate rule.

``batch_size`` is the total over all ranks and nodes (the effective batch), so a config means the same
optimisation on 1 GPU or 64; each rank takes ``batch_size / world_size``. The learning rate follows the
linear scaling rule (Goyal et al., 2017): ``base_lr`` is the rate at ``reference_batch_size`` and the rate
used is ``base_lr * batch_size / reference_batch_size``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Sequence

from .config import Choice
from .errors import ConfigError


class Amp(Choice):
    none = "none"
    bf16 = "bf16"
    fp16 = "fp16"  # with a GradScaler


class CompileMode(Choice):
    """``torch.compile``'s modes, by their names in PyTorch's documentation."""
    default = "default"
    reduce_overhead = "reduce-overhead"  # and CUDA graphs: one replay instead of a launch per kernel
    max_autotune = "max-autotune"  # and a search over kernel variants: much longer compilation


class Schedule(Choice):
    step = "step"
    cosine = "cosine"


@dataclass
class SolverConfig:
    """What every trainer's ``solver:`` holds: SGD, the batch and its learning rate, precision."""
    batch_size: int = 8  # images per iteration, total over all ranks and nodes
    base_lr: float = 0.01  # at reference_batch_size; scaled linearly with batch_size
    reference_batch_size: int = 8
    momentum: float = 0.9
    weight_decay: float = 0.0001
    gamma: float = 0.1  # the step schedule's factor at each step
    amp: Amp = Amp.none
    channels_last: bool = False
    # torch.compile: a detector its dense parts (trunk, neck, box head), any other model the whole network.
    # The first steps compile (seconds on a CPU, about a minute on a GPU: the log says how long).
    compile: bool = False
    clip_grad_norm: float = 0.0  # 0 = off


@dataclass
class IterationSolverConfig(SolverConfig):
    """A schedule counted in iterations (detection, localization): linear warm-up, then steps."""
    max_iter: int = 1000
    steps: list[int] = field(default_factory=list)  # iterations at which lr *= gamma
    warmup_iters: int = 0
    warmup_factor: float = 0.001  # the warm-up starts at this fraction of the rate


def lr_multiplier(progress: float, steps: Sequence[float], gamma: float, warmup: float = 0.0,
                  warmup_factor: float = 0.001, schedule: str = "step", total: float = 0.0) -> float:
    """The factor on the scaled learning rate at ``progress`` (iterations or epochs: the unit of ``steps``,
    ``warmup`` and ``total``), for every trainer: a linear warm-up from ``warmup_factor`` to 1 over
    ``warmup``, times ``gamma`` per step passed (``step``) or a half cosine to 0 at ``total`` (``cosine``)."""
    factor = 1.0
    if progress < warmup:
        factor = warmup_factor + (1 - warmup_factor) * progress / warmup
    if schedule == "step":
        return factor * gamma ** sum(progress >= step for step in steps)
    if schedule == "cosine":
        return factor * 0.5 * (1 + math.cos(math.pi * min(progress / total, 1.0)))
    raise ConfigError(f"solver.schedule must be step or cosine, got {schedule!r}")


def scaled_lr(solver) -> float:
    """``base_lr`` scaled linearly from ``reference_batch_size`` to ``batch_size``."""
    return solver.base_lr * solver.batch_size / solver.reference_batch_size


def describe_scaling(solver, world_size: int) -> str:
    """One line for the log at start: the effective batch over nodes and ranks, and the learning rate it gets."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))  # set by torchrun: ranks on this node
    nodes = max(1, world_size // max(1, local))
    ranks = f"{nodes} nodes x {local} ranks" if nodes > 1 else f"{world_size} rank{'s' if world_size > 1 else ''}"
    return (f"effective batch {solver.batch_size} images = {ranks} x {solver.batch_size // world_size}; "
            f"lr {scaled_lr(solver):.5g} = base_lr {solver.base_lr:g} x {solver.batch_size} / "
            f"{solver.reference_batch_size} (linear scaling from solver.reference_batch_size)")
