"""Training state: atomic checkpoint writes and exact resumption.

A checkpoint is written to a temporary file in the same folder and renamed over the old one, so a
run killed mid-write still has its previous ``last.pth``. Everything is stored as tensors and plain
Python containers so it loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from .errors import ResdetError


def atomic_save(obj, path: str) -> None:
    """Write ``obj`` to a temporary file beside ``path``, then rename it over ``path``: a kill or a full
    disk mid-write leaves the previous file intact. A failed write removes the partial file and raises
    :class:`CheckpointWriteError` naming the path and the cause."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
        try:
            os.remove(tmp)
        except OSError:
            pass
        kept = f"the previous {os.path.basename(path)} is intact" if os.path.isfile(path) else "no earlier file"
        raise CheckpointWriteError(f"{path}: could not write the checkpoint ({exc}); {kept}. Fix: free disk space "
                                   "(or point output_dir at a disk with room) and rerun with resume=auto") from exc


RESUME_MODES = ("false", "true", "auto")
logger = logging.getLogger(__name__)


class CheckpointWriteError(ResdetError, OSError):
    """A checkpoint could not be written (disk full, quota, permissions); the previous one is intact."""


def resume_mode(value) -> str:
    """``resume`` as one of RESUME_MODES (YAML and the command line may give a bool or a string)."""
    mode = str(value).strip().lower()
    if mode not in RESUME_MODES:
        from .config import ConfigError
        raise ConfigError(f"resume={value!r}; use one of {list(RESUME_MODES)}")
    return mode


def should_resume(value, checkpoint: str, required: bool = True) -> bool:
    """Whether to load ``checkpoint`` for ``resume=value``. ``true`` with no checkpoint is an error when
    ``required`` (a mistyped output_dir should not silently start over); ``auto`` starts fresh."""
    mode = resume_mode(value)
    if mode == "false":
        return False
    if os.path.isfile(checkpoint):
        return True
    if mode == "true" and required:
        from .config import ConfigError
        raise ConfigError(f"resume=true but {checkpoint} does not exist; fix: check output_dir, or use "
                          "resume=auto to start fresh when there is no checkpoint yet")
    logger.info("resume=%s: no checkpoint at %s yet, starting fresh", mode, checkpoint)
    return False


def load_checkpoint(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(obj):
    return tuple(_as_tuple(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def keyed_generator(*keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by ``keys`` alone (e.g. seed, iteration, rank), for random choices that must not
    depend on the run's history. A resumed run restores the global generators as they were saved, but
    not every draw falls at the same place: a DataLoader takes its base seed from the global generator
    each time it is iterated, which an uninterrupted run does at epoch starts and a resumed one mid-epoch.
    Sampling (anchors, RoIs) and loaders seeded per key draw the same in both."""
    seed = int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator(device=device).manual_seed(seed)


def training_state(model, optimizer, scheduler, scaler, iteration: int, rngs: list, **extra) -> dict:
    """Everything a killed run needs to continue exactly: weights, optimizer, schedule, scaler, RNGs."""
    return dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(), rng=rngs, iteration=iteration, **extra)


def restore_training_state(path: str, model, optimizer, scheduler, scaler, rank: int) -> dict:
    """Load ``path`` (written by ``training_state``) into the objects; return the whole state dict."""
    state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])  # more ranks than saved: reuse rank 0's
    return state
