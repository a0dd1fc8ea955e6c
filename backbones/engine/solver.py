"""What the solver settings mean for a run of any size: one batch-size convention, one learning-rate rule.

``batch_size`` is the total over all ranks and nodes (the effective batch), so a config means the same
optimisation on 1 GPU or 64; each rank takes ``batch_size / world_size``. The learning rate follows the
linear scaling rule (Goyal et al., 2017): ``base_lr`` is the rate at ``reference_batch_size`` and the rate
used is ``base_lr * batch_size / reference_batch_size``.
"""
from __future__ import annotations

import os


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
