"""The one training loop: pretraining, detection, and localization's RPN and R-CNN stages all run here.

A task builds its model, optimizer, schedule and data, and gives the :class:`Trainer`:

* ``loader(epoch, offset)``: every remaining batch of the run, starting ``offset`` batches into ``epoch``
  (exact mid-epoch resumption) and ending at ``max_iter``; it is called once, so its workers live for the
  whole run (:mod:`~backbones.engine.loader`). A task without epochs (the R-CNN stage) sets
  ``iters_per_epoch`` to the run's length;
* ``prepare(batch, iteration)``: ``(inputs, samples, skipped)``, with ``inputs`` None when every image of
  this rank's batch was unreadable (``skipped`` of them counted);
* ``forward(inputs)``: the loss terms, computed under autocast;
* ``save_state(iteration)``: write the resumable checkpoint (every rank calls it; it gathers RNG states);
* hooks: ``after_step(iteration)`` (evaluation, best checkpoint) and ``after_epoch(epoch, iteration)``. A
  stop signal during one (an evaluation, :func:`~backbones.engine.preemption.interruptible`) checkpoints the
  iteration and notes the hooks still owed beside the checkpoint; the resumed run runs them first.

The trainer owns what every task did the same way: the order of a step (a step where any rank has no
batch is skipped by all ranks together, so their collectives stay paired and iterations still map to
epochs), autocast, the optimizer step (:func:`~backbones.engine.precision.optimizer_step`) and the loss check
one step behind it (:class:`LossProbe`, so the host never waits for the device between steps),
the schedule advancing once per iteration, preemption (:func:`~backbones.engine.preemption.after_step`),
the progress bar, the loss window written to ``metrics.jsonl`` / TensorBoard, periodic checkpoints, and the
host allocator's thresholds (:mod:`~backbones.engine.hostmem`: a step's memory is reused, not re-faulted).
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from typing import Any, Callable, Iterable

import torch
from torch.nn.parallel import DistributedDataParallel

from .dist import every_rank_has_batch, is_main_process
from .hostmem import ENV as HOST_MALLOC_ENV, keep_freed_host_memory
from .precision import STEP_HINT, advance_schedule, non_finite_loss, optimizer_step
from .preemption import EvaluationInterrupted, after_step, stopped
from .run import LossWindow, RunFolder, get_logger, progress_bar, write_json_atomic


def distribute(model: torch.nn.Module, device: torch.device, world_size: int, channels_last: bool = False,
               find_unused_parameters: bool = False, compile: bool = False) -> torch.nn.Module:
    """The module a step calls: ``model`` in channels-last layout if asked, compiled if asked (in place, so
    parameter names and checkpoints are unchanged: a model with ``compile_parts`` compiles the parts it
    names, any other all of itself), wrapped in DDP under torchrun."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        if hasattr(model, "compile_parts"):
            parts = model.compile_parts()
        else:
            model.compile()
            parts = ["the whole model"]
        get_logger().info("torch.compile: %s (compiled at the first steps; the first step's time is logged)",
                          ", ".join(parts))
    if world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused_parameters)


def sgd(params, lr: float, momentum: float, weight_decay: float, lr_lambda: Callable[[int], float],
        device: torch.device, amp, nesterov: bool = False):
    """SGD at ``lr`` with a per-iteration ``LambdaLR`` schedule, and the GradScaler (active for fp16 only):
    ``(optimizer, scheduler, scaler)``, what every task trains with."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    return optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=amp == "fp16")


class LossProbe:
    """A step's loss terms, brought to the host without making the host wait for the device.

    Reading a CUDA loss (to check it is finite, to average it for the log) waits until the step's last
    kernel has run, so the host cannot queue the next step meanwhile and the GPU idles between steps.
    Here the terms are copied into pinned memory behind the step and read one step later, when the copy
    is long done. A step whose loss is not finite is therefore reported one step late; the trainer reads
    every pending step before it logs, checkpoints or finishes, so no checkpoint holds the weights it
    produced. On a CPU the copy is the read itself."""

    def __init__(self, device: torch.device):
        self.device, self.pending = device, None

    def put(self, losses: dict[str, torch.Tensor], samples: int, iteration: int):
        """Queue this step's copy; returns the previous step's ``(terms, samples, iteration)`` or None."""
        values = torch.stack([v.detach().float() for v in losses.values()])
        event = None
        if self.device.type == "cuda":
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            host.copy_(values, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            values = host
        previous, self.pending = self.take(), (list(losses), values, event, samples, iteration)
        return previous

    def take(self):
        """The pending step's ``(terms, samples, iteration)`` (waiting for its copy), or None."""
        if self.pending is None:
            return None
        names, values, event, samples, iteration = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        return dict(zip(names, values.tolist())), samples, iteration


class Trainer:
    def __init__(self, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler,
                 device: torch.device, amp_dtype: torch.dtype | None, run: RunFolder, max_iter: int,
                 iters_per_epoch: int, loader: Callable[[int, int], Iterable],
                 prepare: Callable[[Any, int], tuple[Any, int, int]], forward: Callable[[Any], dict],
                 save_state: Callable[[int], None], checkpoint: str, log_period: int, checkpoint_period: int,
                 params=None, clip_grad_norm: float = 0.0, debug_stop_at_iter: int = 0, debug_iteration_offset: int = 0,
                 should_checkpoint: Callable[[int], bool] | None = None, log_every_epoch: bool = False,
                 sync_empty_batches: bool = True, metrics_prefix: str = "train/", rate_name: str = "img_per_s",
                 log_extra: Callable[[int], dict] | None = None, desc: str = "train", hint: str = STEP_HINT):
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.device, self.amp_dtype, self.run = device, amp_dtype, run
        self.max_iter, self.iters_per_epoch = max_iter, iters_per_epoch
        self.loader, self.prepare, self.forward, self.save_state = loader, prepare, forward, save_state
        self.checkpoint, self.log_period, self.checkpoint_period = checkpoint, log_period, checkpoint_period
        self.params, self.clip_grad_norm, self.hint = params, clip_grad_norm, hint
        self.debug_stop_at_iter, self.debug_iteration_offset = debug_stop_at_iter, debug_iteration_offset
        self.should_checkpoint = should_checkpoint or self.periodic_checkpoint
        self.log_every_epoch, self.sync_empty_batches = log_every_epoch, sync_empty_batches
        self.metrics_prefix, self.rate_name, self.log_extra, self.desc = metrics_prefix, rate_name, log_extra, desc
        self.after_step_hooks: list[Callable[[int], None]] = []
        self.after_epoch_hooks: list[Callable[[int, int], None]] = []
        self.iteration, self.progress = 0, None
        self.skipped = 0  # unreadable training images so far (restored on resume by the task)

    def periodic_checkpoint(self, iteration: int) -> bool:
        return bool(self.checkpoint_period and iteration % self.checkpoint_period == 0) or iteration == self.max_iter

    def train(self, start_iter: int = 0) -> int:
        """Train from ``start_iter`` to ``max_iter``; returns the last iteration."""
        self.iteration = start_iter
        if keep_freed_host_memory():  # before the loader forks its workers, which inherit it
            self.run.logger.info("host memory: freed blocks stay in the process for the next step (glibc's mmap "
                                 "and trim thresholds raised; %s=system keeps its defaults)", HOST_MALLOC_ENV)
        window, self.probe = LossWindow(), LossProbe(self.device)
        owed = self.owed_hooks(start_iter)
        if owed:  # a stop signal interrupted them (an evaluation) before this checkpoint's run stopped
            self.run.logger.info("running the %s hooks of iteration %d first (a stop signal interrupted them)",
                                 owed, start_iter)
            self.run_hooks(start_iter, window, owed)
            self.forget_owed_hooks()  # made up: the note is spent
        self.progress = progress = progress_bar(total=self.max_iter, initial=start_iter, desc=self.desc)
        if start_iter < self.max_iter:
            self.run_batches(self.loader(*divmod(start_iter, self.iters_per_epoch)), window)
        progress.close()
        return self.iteration

    def run_batches(self, batches: Iterable, window: LossWindow) -> None:
        """Step through ``batches`` to ``max_iter``, with the hooks after each step and each epoch's end."""
        first = self.iteration + 1
        self.model.train()
        for batch in batches:
            started = time.perf_counter()
            self.step(batch, window)
            if self.iteration == first:  # start-up costs land here: compilation, cuDNN autotuning
                self.run.logger.info("first step: %.1f s", time.perf_counter() - started)
            self.progress.update(1)
            if self.iteration % self.iters_per_epoch == 0:
                self.record(self.probe.take(), window)  # the hooks may checkpoint
            self.run_hooks(self.iteration, window)
            if self.iteration >= self.max_iter:
                self.record(self.probe.take(), window)
                return
        epoch, offset = divmod(self.iteration, self.iters_per_epoch)
        raise RuntimeError(f"{self.desc}: the data loader ran dry at iteration {self.iteration} of {self.max_iter} "
                           f"(epoch {epoch}, {offset} batches in)")

    def record(self, step: tuple | None, window: LossWindow) -> None:
        """A step's loss terms read back by the probe: stop if they are not finite, else into the window."""
        if step is None:
            return
        terms, samples, iteration = step
        if not all(map(math.isfinite, terms.values())):
            raise non_finite_loss(sum(terms.values()), iteration, terms, self.hint)
        window.add(terms, samples)

    def save_checked(self, window: LossWindow, iteration: int) -> None:
        """``save_state`` once the last step's loss is known to be finite."""
        self.record(self.probe.take(), window)
        self.save_state(iteration)
        self.forget_owed_hooks()  # a note about an older checkpoint

    def step(self, batch, window: LossWindow) -> None:
        iteration = self.iteration
        inputs, samples, skipped = self.prepare(batch, iteration)
        self.skipped += skipped
        if not self.sync_empty_batches or every_rank_has_batch(inputs is not None):
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                losses = self.forward(inputs)
            optimizer_step(sum(losses.values()), self.optimizer, self.scaler, self.params, self.clip_grad_norm,
                           iteration=iteration, hint=self.hint, check_finite=False)
            self.record(self.probe.put(losses, samples, iteration), window)
        advance_schedule(self.scheduler)
        self.iteration = iteration = iteration + 1
        after_step(iteration, functools.partial(self.save_checked, window), self.checkpoint,
                   self.debug_stop_at_iter, self.debug_iteration_offset + iteration)
        epoch_end = self.log_every_epoch and iteration % self.iters_per_epoch == 0
        if iteration % self.log_period == 0 or iteration == self.max_iter or epoch_end:
            self.record(self.probe.take(), window)
            self.log(window)
        if self.should_checkpoint(iteration):
            self.save_checked(window, iteration)

    @property
    def owed_path(self) -> str:
        return self.checkpoint + ".owed_hooks.json"

    def owed_hooks(self, iteration: int) -> str | None:
        """``"step"`` or ``"epoch"``: the hooks of ``iteration`` a stop signal interrupted, if the checkpoint
        resumed from is the one written then."""
        try:
            with open(self.owed_path) as f:
                owed = json.load(f)
        except (OSError, ValueError):
            return None
        return owed["hooks"] if owed.get("iteration") == iteration else None

    def forget_owed_hooks(self) -> None:
        if is_main_process() and os.path.exists(self.owed_path):
            os.remove(self.owed_path)

    def run_hooks(self, iteration: int, window: LossWindow, start: str = "step") -> None:
        """The after-step hooks (from ``start="step"``), then at an epoch's end the after-epoch hooks. On
        :class:`EvaluationInterrupted`: the checkpoint of ``iteration``, a note of the hooks owed, stop."""
        stage = start
        epoch_end = iteration % self.iters_per_epoch == 0
        if not (self.after_step_hooks and start == "step" or self.after_epoch_hooks and epoch_end):
            return
        try:
            if stage == "step":
                for hook in self.after_step_hooks:
                    hook(iteration)
            if epoch_end:
                stage = "epoch"
                for hook in self.after_epoch_hooks:
                    hook(iteration // self.iters_per_epoch - 1, iteration)
        except EvaluationInterrupted:
            self.save_checked(window, iteration)
            if is_main_process():
                write_json_atomic(self.owed_path, {"iteration": iteration, "hooks": stage})
            raise stopped(iteration, self.checkpoint) from None
        self.model.train()  # the hooks may have evaluated

    def log(self, window: LossWindow) -> None:
        avg, rate = window.flush(self.device)
        lr = self.optimizer.param_groups[0]["lr"]
        if self.progress is not None and "loss" in avg:
            self.progress.set_postfix(loss=f"{avg['loss']:.3f}", lr=f"{lr:.4g}", **{self.rate_name: f"{rate:.1f}"})
        self.run.log_metrics(self.iteration, dict(avg, lr=lr, **{self.rate_name: rate},
                                                  **(self.log_extra(self.iteration) if self.log_extra else {})),
                             prefix=self.metrics_prefix)
