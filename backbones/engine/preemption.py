"""Runs that survive the cluster: a termination signal becomes a checkpoint at the next step boundary.

SLURM (``--signal``, preemption, time limit) and cloud spot reclaims send SIGTERM (or SIGUSR1) some
seconds before they kill a job. :class:`catch_stop_signals` records the signal instead of dying; every trainer
asks it after each step (:func:`after_step`, which under torchrun makes all ranks agree, so
they stop at the same iteration), writes its checkpoint and raises :class:`Preempted`; the tools exit
with :data:`PREEMPTED_EXIT_CODE`, so a job script can tell "requeue me" from a crash. With
``resume=auto`` the same command then resumes, or starts fresh when there is no checkpoint yet.

Under torchrun the agent forwards SIGTERM to every worker and kills them 30 s later (its default),
so a step plus a checkpoint must fit in that time.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Iterable, Iterator

from .dist import agree, agree_min

logger = logging.getLogger(__name__)
_ACTIVE: "catch_stop_signals | None" = None  # the one a tool entered, asked by after_step()

# EX_TEMPFAIL (sysexits.h): "temporary failure, try again": a checkpoint was written, resume=auto continues
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """Every DataLoader's ``worker_init_fn``: a loader worker leaves SIGTERM and SIGUSR1 to the main process.

    SLURM signals every process of a job step, and ``timeout`` or ``kill -- -PGID`` a whole process group;
    a worker killed by the signal made the main process fail at its next batch ("DataLoader worker ...
    is killed by signal: Terminated") instead of writing its checkpoint. A worker still exits when the
    main process does (the DataLoader's shutdown, or PyTorch's watchdog when the main process is gone)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class Preempted(RuntimeError):
    """A termination signal arrived; the run wrote its checkpoint at ``iteration`` and stopped."""

    def __init__(self, iteration: int, signal_name: str, checkpoint: str):
        super().__init__(f"stopped by {signal_name} at iteration {iteration}; checkpoint {checkpoint} written. "
                         f"Run the same command with resume=auto (or resume=true) to continue "
                         f"(exit code {PREEMPTED_EXIT_CODE})")
        self.iteration, self.signal_name, self.checkpoint = iteration, signal_name, checkpoint


class catch_stop_signals:
    """``with catch_stop_signals():`` around a trainer (the tools do): SIGTERM and SIGUSR1 are recorded for
    :func:`after_step` instead of killing the process; the previous handlers come back on exit. Outside
    the main thread signals cannot be caught, and nothing is installed."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "catch_stop_signals":
        global _ACTIVE
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        _ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE
        _ACTIVE = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            logger.warning("received %s: writing a checkpoint at the end of this step, then stopping",
                           signal.Signals(signum).name)
        self.received = signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a peer rank's signal"

    def requested(self) -> bool:
        """Whether to stop now. Under torchrun every rank takes part (one small all-reduce per step, on the
        host) and all get the same answer, even when only some received the signal."""
        return agree(self.received is not None, every=False)


class EvaluationInterrupted(Exception):
    """A stop signal arrived while a training run evaluated (:func:`interruptible`); the trainer checkpoints the
    iteration, notes the evaluation as owed, and stops with :class:`Preempted`."""


def interruptible(batches: Iterable, count: int | None = None) -> Iterator:
    """The batches of an evaluation that stops at a stop signal when it runs inside a training run.

    A periodic evaluation over COCO val takes minutes, longer than the grace SLURM gives between the signal
    and the kill; run to its end it lost the checkpoint, and the training since the last one. Here it raises
    :class:`EvaluationInterrupted` before the next batch instead. Outside training (``tools/eval_det.py``)
    it changes nothing. Under torchrun the ranks agree before each of the batches every rank has (``count``:
    this rank's number of batches, ``len(batches)`` by default; shards may differ by one), so none is left
    waiting in a collective."""
    if _ACTIVE is None:
        yield from batches
        return
    common = agree_min(len(batches) if count is None else count)
    for index, batch in enumerate(batches):
        if index < common and _ACTIVE.requested():
            raise EvaluationInterrupted(
                f"stopped by {_ACTIVE.signal_name} during an evaluation after training; the last checkpoint "
                f"holds the trained weights. Run the same command with resume=auto to evaluate "
                f"(exit code {PREEMPTED_EXIT_CODE})")
        yield batch


def stopped(iteration: int, checkpoint: str) -> Preempted:
    """The :class:`Preempted` to raise once the checkpoint of ``iteration`` is written."""
    return Preempted(iteration, _ACTIVE.signal_name if _ACTIVE else "a stop signal", checkpoint)


def after_step(iteration: int, save, checkpoint: str, debug_stop_at_iter: int = 0,
               debug_iteration: int | None = None) -> None:
    """What every training loop does after each step, in one place:

    * the test-only abrupt stop (``debug_stop_at_iter``: ``os._exit(3)``, no cleanup and no checkpoint, as a
      killed process), compared with ``debug_iteration`` when the loop counts on from an earlier stage;
    * the preemption check: on a stop signal (any rank's), ``save(iteration)`` on every rank, then
      :class:`Preempted`."""
    if debug_stop_at_iter and (iteration if debug_iteration is None else debug_iteration) == debug_stop_at_iter:
        os._exit(3)
    if _ACTIVE is not None and _ACTIVE.requested():
        save(iteration)
        raise stopped(iteration, checkpoint)
