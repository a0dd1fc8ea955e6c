"""The training step every trainer shares (backbones.engine.precision.optimizer_step)."""
import pytest
import torch

from backbones.engine.precision import optimizer_step


def make(lr=1.0):
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 1)
    return layer, torch.optim.SGD(layer.parameters(), lr=lr), torch.amp.GradScaler("cpu", enabled=False)


def test_non_finite_loss_stops_before_touching_the_weights():
    layer, optimizer, scaler = make()
    before = [p.detach().clone() for p in layer.parameters()]
    loss = layer(torch.ones(1, 3)).sum() * float("nan")
    with pytest.raises(FloatingPointError, match=r"iteration 7 \(\{'loss_cls': nan\}\); lower solver.base_lr"):
        optimizer_step(loss, optimizer, scaler, layer.parameters(), iteration=7, losses={"loss_cls": loss})
    for b, p in zip(before, layer.parameters()):
        assert torch.equal(b, p)


def test_gradient_clipping_bounds_the_update():
    layer, optimizer, scaler = make(lr=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in layer.parameters()])
    loss = 100.0 * layer(torch.ones(1, 3)).sum()  # gradient norm 100 * sqrt(4) = 200
    optimizer_step(loss, optimizer, scaler, list(layer.parameters()), clip_grad_norm=0.5, iteration=0)
    after = torch.cat([p.detach().flatten() for p in layer.parameters()])
    assert float((after - before).norm()) == pytest.approx(0.5, rel=1e-4)  # plain SGD, lr 1: update = clipped grad
    # without clipping the same step moves the weights by the full gradient norm
    layer, optimizer, scaler = make(lr=1.0)
    optimizer_step(100.0 * layer(torch.ones(1, 3)).sum(), optimizer, scaler, None, iteration=0)
    after = torch.cat([p.detach().flatten() for p in layer.parameters()])
    assert float((after - before).norm()) == pytest.approx(200.0, rel=1e-4)


def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    import errno

    from backbones.engine import state
    path = str(tmp_path / "last.pth")
    state.atomic_save({"iteration": 1}, path)

    def full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state.torch, "save", full_disk)
    with pytest.raises(state.CheckpointWriteError, match=r"last.pth: could not write.*No space left.*previous "
                                                         r"last.pth is intact.*free disk space"):
        state.atomic_save({"iteration": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"iteration": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]  # the partial file is gone


def test_resume_modes():
    from backbones.engine.config import ConfigError
    from backbones.engine.state import should_resume
    assert should_resume("auto", "/nonexistent/last.pth") is False
    assert should_resume(False, "/nonexistent/last.pth") is False
    with pytest.raises(ConfigError, match="resume=true but /nonexistent/last.pth does not exist"):
        should_resume(True, "/nonexistent/last.pth")  # YAML's true arrives as a bool or "True"
    with pytest.raises(ConfigError, match="use one of"):
        should_resume("sometimes", "/nonexistent/last.pth")


def test_scaling_line_counts_nodes_from_torchrun_and_scales_lr_linearly(monkeypatch):
    from types import SimpleNamespace

    from backbones.engine.solver import describe_scaling, scaled_lr
    solver = SimpleNamespace(batch_size=32, base_lr=0.02, reference_batch_size=16)
    assert scaled_lr(solver) == pytest.approx(0.04)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun: 8 ranks per node, 16 in all -> 2 nodes
    assert describe_scaling(solver, 16).startswith("effective batch 32 images = 2 nodes x 8 ranks x 2; lr 0.04 ")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert describe_scaling(solver, 1).startswith("effective batch 32 images = 1 rank x 32; lr 0.04 = base_lr 0.02")


def test_trainer_stops_at_a_non_finite_loss_before_any_checkpoint_holds_its_weights():
    """The Trainer reads each step's loss one step late (LossProbe: the host does not wait for the device);
    a NaN loss still stops the run naming its iteration, and no checkpoint is written after it."""
    import logging
    from types import SimpleNamespace

    from backbones.engine.trainer import Trainer, sgd
    layer, _, _ = make()
    optimizer, scheduler, scaler = sgd(layer.parameters(), 0.1, 0.9, 0.0, lambda it: 1.0, torch.device("cpu"), "none")
    saved, x = [], torch.ones(1, 3)

    def forward(iteration):
        loss = layer(x).sum().square()
        return {"loss_cls": loss * float("nan") if iteration == 3 else loss}

    run = SimpleNamespace(logger=logging.getLogger("test"), log_metrics=lambda *a, **k: None)
    trainer = Trainer(model=layer, optimizer=optimizer, scheduler=scheduler, scaler=scaler, device=torch.device("cpu"),
                      amp_dtype=None, run=run, max_iter=10, iters_per_epoch=10, loader=lambda epoch, offset: range(10),
                      prepare=lambda batch, iteration: (iteration, 1, 0), forward=forward,
                      save_state=lambda iteration: saved.append((iteration, layer.weight.detach().clone())),
                      checkpoint="unused", log_period=100, checkpoint_period=1)
    with pytest.raises(FloatingPointError, match=r"at iteration 3 \(\{'loss_cls': nan\}\)"):
        trainer.train()
    assert [it for it, _ in saved] == [1, 2, 3]  # the state after iteration 3's step (4) is never written
    assert all(torch.isfinite(w).all() for _, w in saved)


def test_a_stop_signal_during_an_evaluation_checkpoints_and_the_resumed_run_makes_the_evaluation_up(tmp_path):
    """SIGTERM while a training run evaluates (minutes on COCO val, longer than SLURM's grace): the evaluation
    ends at its next batch, the iteration is checkpointed, the run stops with Preempted; resumed there, the
    interrupted hooks (the evaluation, then the epoch's end it preceded) run first, and training goes on."""
    import logging
    import os
    import signal
    from types import SimpleNamespace

    from backbones.engine.preemption import Preempted, catch_stop_signals, interruptible
    from backbones.engine.trainer import Trainer, sgd
    layer, _, _ = make()
    run = SimpleNamespace(logger=logging.getLogger("test"), log_metrics=lambda *a, **k: None)
    checkpoint = str(tmp_path / "last.pth")
    saved, evaluated, epochs_ended = [], [], []

    def trainer(signal_at=None):
        optimizer, scheduler, scaler = sgd(layer.parameters(), 0.1, 0.9, 0.0, lambda it: 1.0, torch.device("cpu"),
                                           "none")
        t = Trainer(model=layer, optimizer=optimizer, scheduler=scheduler, scaler=scaler, device=torch.device("cpu"),
                    amp_dtype=None, run=run, max_iter=10, iters_per_epoch=5,
                    loader=lambda epoch, offset: range(epoch * 5 + offset, 10), prepare=lambda b, it: (b, 1, 0),
                    forward=lambda b: {"loss_cls": layer(torch.ones(1, 3)).sum().square()},
                    save_state=saved.append, checkpoint=checkpoint, log_period=100, checkpoint_period=0)

        def periodic_eval(iteration):
            if iteration % 5:
                return
            for batch in interruptible(range(6), 6):
                if (iteration, batch) == signal_at:
                    os.kill(os.getpid(), signal.SIGTERM)  # what SLURM sends, here mid-evaluation
            evaluated.append(iteration)  # reached only by a complete evaluation

        t.after_step_hooks.append(periodic_eval)
        t.after_epoch_hooks.append(lambda epoch, iteration: epochs_ended.append((epoch, iteration)))
        return t

    with catch_stop_signals(), pytest.raises(Preempted, match="stopped by SIGTERM at iteration 5"):
        trainer(signal_at=(5, 2)).train()
    assert saved == [5] and evaluated == [] and epochs_ended == []
    with catch_stop_signals():
        assert trainer().train(start_iter=5) == 10
    assert evaluated == [5, 10] and epochs_ended == [(0, 5), (1, 10)]
    assert saved == [5, 10] and not os.path.exists(checkpoint + ".owed_hooks.json")
    # outside a training run (tools/eval_det.py) the signal does not end an evaluation
    assert list(interruptible(range(3), 3)) == [0, 1, 2]
