"""Solver settings both trainers check the same way before any work: autocast precision and the
split of the total batch over ranks."""
from __future__ import annotations

import torch

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_solver(solver, world_size: int) -> torch.dtype | None:
    """Validate ``solver.amp`` and ``solver.batch_size``; return the autocast dtype (None = fp32)."""
    if solver.amp not in AMP_DTYPES:
        raise ValueError(f"solver.amp must be one of {list(AMP_DTYPES)}, got {solver.amp!r}")
    if solver.batch_size % world_size:
        raise ValueError(f"solver.batch_size={solver.batch_size} is the total over ranks: it must be divisible "
                         f"by the {world_size} processes")
    return AMP_DTYPES[solver.amp]
