"""Solver settings both trainers check the same way before any work: autocast precision and the
split of the total batch over ranks."""
from __future__ import annotations

import warnings

import torch

from .errors import ConfigError

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_solver(solver, world_size: int) -> torch.dtype | None:
    """Validate ``solver.amp`` and ``solver.batch_size``; return the autocast dtype (None = fp32)."""
    if solver.amp not in AMP_DTYPES:
        raise ConfigError(f"solver.amp must be one of {list(AMP_DTYPES)}, got {solver.amp!r}")
    if solver.batch_size % world_size:
        raise ConfigError(f"solver.batch_size={solver.batch_size} is the total over ranks: it must be divisible "
                         f"by the {world_size} processes")
    return AMP_DTYPES[solver.amp]


STEP_HINT = "lower solver.base_lr, add solver.warmup_iters or set solver.clip_grad_norm"


def non_finite_loss(loss: float, iteration: int, terms: dict[str, float] | None = None,
                    hint: str = STEP_HINT) -> FloatingPointError:
    """The error that stops a run whose loss is not finite: the iteration, the loss terms, what to change."""
    detail = f" ({terms})" if terms else ""
    return FloatingPointError(f"loss became {loss} at iteration {iteration}{detail}; {hint}")


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, params,
                   clip_grad_norm: float = 0.0, *, iteration: int, losses: dict | None = None,
                   hint: str = STEP_HINT, check_finite: bool = True) -> None:
    """One training step of every trainer: backward through the GradScaler (a no-op unless fp16),
    optional gradient-norm clipping (on unscaled gradients), the optimizer step.

    With ``check_finite``, a non-finite loss stops the run before it corrupts the weights, naming the
    iteration, the loss terms and what to change. That check reads the loss on the host, so on a GPU the
    host waits for the step; the :class:`~backbones.engine.trainer.Trainer` checks one step later instead."""
    if check_finite and not torch.isfinite(loss):
        raise non_finite_loss(loss.detach().item(), iteration,
                              {k: float(v.detach()) for k, v in losses.items()} if losses else None, hint)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()


def advance_schedule(scheduler) -> None:
    """``scheduler.step()`` once per iteration, trained or not. A skipped step (every image of the batch
    unreadable, or fp16's scaler skipping an overflow) still advances the schedule so iterations map to
    the learning rate exactly; PyTorch would then warn "lr_scheduler.step() before optimizer.step()" as
    if the loop were wrong, so that one warning is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        scheduler.step()
