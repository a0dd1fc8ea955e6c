"""Run infrastructure every application shares (pretraining, detection, localization).

* ``trainer.py``: the one training loop (:class:`~backbones.engine.trainer.Trainer`); a task gives it a
  loader, a step and hooks;
* ``solver.py``: the solver schema every config extends, the learning-rate scaling rule and schedule;
* ``precision.py``: autocast dtypes, the optimizer step with its loss check; ``preemption.py``: stop
  signals and the test-only abrupt stop; ``state.py``: checkpoints, resume, RNG states;
* ``run.py``: the run folder (log, metrics.jsonl, TensorBoard, summary.json), progress and loss windows;
* ``config.py``: YAML on structured defaults with ``_base_`` and ``key=value``; ``cli.py``: the tools'
  shared argument grammar and runner; ``dist.py``: torchrun / DDP helpers; ``imageio.py``: image reading;
  ``hostmem.py``: the host allocator's thresholds for a training process.

It imports third-party libraries only (torch, omegaconf, numpy, OpenCV/Pillow, tqdm), nothing from
``backbones``' models or from ``detection``, so every application can build on it.
"""
