"""The one evaluation loop: run a detector over a loader (its boxes come out in the image files' pixels:
the loader's targets carry each image's frame) and feed every evaluator (sharded over ranks; each
evaluator gathers and scores on rank 0)."""
from __future__ import annotations

import torch

from backbones.engine.dist import is_main_process, reduce_sum
from backbones.engine.preemption import interruptible
from backbones.engine.run import progress_bar
from backbones.engine.state import unwrap


@torch.no_grad()
def evaluate(model, loader, evaluators: list, device: torch.device, amp_dtype: torch.dtype | None = None,
             progress: bool = True) -> dict:
    """Score ``model`` on ``loader`` with ``evaluators`` (from :func:`detection.data.build.build_evaluators`).

    The first evaluator's metrics are the result (``metrics["AP"]`` is what best.pth is kept by); each further
    one's are nested under its ``name`` (pycocotools' ``"coco"`` beside the VOC mAP). Every image of the set is
    scored; one that could not be read counts as an image without detections (``num_unprocessed``) unless the
    evaluators were made with ``only_processed``; ``skipped_corrupt`` counts them over all ranks."""
    for evaluator in evaluators:
        evaluator.reset()
    model = unwrap(model)
    was_training = model.training
    model.eval()
    skipped = 0
    # inside a training run, a stop signal ends the evaluation at the next batch (the trainer checkpoints)
    for batch in progress_bar(iterable=interruptible(loader), total=len(loader), desc="eval",
                              disable=not (progress and is_main_process())):
        skipped += batch["num_skipped"]
        if not batch["targets"]:
            continue
        batch["images"] = batch["images"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            detections = model(batch)
        detections = [{key: value.cpu() for key, value in det.items()} for det in detections]
        for evaluator in evaluators:
            evaluator.process(batch["targets"], detections)
    model.train(was_training)
    results = [evaluator.evaluate() for evaluator in evaluators]  # every rank takes part in each gather
    metrics = results[0]
    if metrics:
        for evaluator, extra in zip(evaluators[1:], results[1:]):
            metrics[evaluator.name] = extra
    skipped = int(reduce_sum({"s": skipped}, device)["s"])
    if metrics is not None and is_main_process():
        metrics["skipped_corrupt"] = skipped
    return metrics or {}
