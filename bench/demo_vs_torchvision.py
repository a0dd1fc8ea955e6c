#!/usr/bin/env python
"""The demo detector against the same C4 design assembled from torchvision parts, given the same
data, the same trunk initialisation and the same training time; both scored by pycocotools on the
synthetic val split. Prints one table.

    python bench/demo_vs_torchvision.py --seconds 300                              # both from scratch
    python bench/demo_vs_torchvision.py --seconds 300 --backbone runs/pretrain_demo/checkpoints/backbone.pth

torchvision side: ``torchvision.models.detection.FasterRCNN`` (its transform, RPN, RoI heads) on a
trunk of the same slim ResNet-18 (stem..res4) with res5 as the box head, our demo settings for
anchors, proposals, RoIs and image size, SGD with the same schedule.
"""
import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision.models.detection import FasterRCNN  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor  # noqa: E402
from torchvision.ops import MultiScaleRoIAlign  # noqa: E402

from backbones.engine.config import load_config  # noqa: E402
from detection.config import DetConfig  # noqa: E402
from detection.data.batching import build_batch_sampler, collate_detection  # noqa: E402
from detection.engine import build_datasets, prepare_data_paths, to_original  # noqa: E402
from detection.evaluation.coco_eval import COCOEvaluator  # noqa: E402
from detection.modeling.build import build_backbone, build_detector  # noqa: E402


def torchvision_parts(cfg, num_classes):
    resnet, mean, std = build_backbone(cfg.model.backbone)  # same trunk weights and freezing as ours
    trunk = nn.Sequential(resnet.stem, resnet.res2, resnet.res3, resnet.res4)
    trunk.out_channels = resnet.stage_channels["res4"]
    head = nn.Sequential(resnet.res5, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    r, h, d = cfg.model.rpn, cfg.model.roi_heads, cfg.data
    return FasterRCNN(
        trunk, num_classes=None, min_size=d.min_size_train[0], max_size=d.max_size_train,
        image_mean=[m / 255 for m in mean], image_std=[s / 255 for s in std],
        rpn_anchor_generator=AnchorGenerator((tuple(r.anchor_sizes),), (tuple(r.aspect_ratios),)),
        rpn_pre_nms_top_n_train=r.pre_nms_topk_train, rpn_post_nms_top_n_train=r.post_nms_topk_train,
        rpn_pre_nms_top_n_test=r.pre_nms_topk_test, rpn_post_nms_top_n_test=r.post_nms_topk_test,
        rpn_batch_size_per_image=r.batch_size_per_image,
        box_roi_pool=MultiScaleRoIAlign(["0"], h.pooler_resolution, h.pooler_sampling_ratio), box_head=head,
        box_predictor=FastRCNNPredictor(resnet.stage_channels["res5"], num_classes + 1),
        box_batch_size_per_image=h.batch_size_per_image, box_score_thresh=h.score_thresh,
        box_detections_per_img=h.detections_per_img,
    )


def ours_step(model, batch):
    return model(batch)


def tv_inputs(batch):
    images = [img[:, :h, :w].float() / 255.0 for img, (h, w) in zip(batch["images"], batch["image_sizes"])]
    return images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in batch["targets"]]


def tv_step(model, batch):
    images, targets = tv_inputs(batch)
    return model(images, targets) if model.training else model(images)


def train_for(model, step, cfg, train_set, seconds):
    s = cfg.solver
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=s.base_lr * s.batch_size / s.reference_batch_size, momentum=s.momentum,
                          weight_decay=s.weight_decay)
    sampler = build_batch_sampler(train_set.aspect_ratios(), s.batch_size, shuffle=True, seed=cfg.seed,
                                  distributed=False, drop_last=True)
    collate = functools.partial(collate_detection, size_divisibility=cfg.data.size_divisibility)
    model.train()
    iteration, start, epoch = 0, time.time(), 0
    while time.time() - start < seconds:
        sampler.set_epoch(epoch)
        for batch in DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.workers):
            warm = min(1.0, (iteration + 1) / max(1, s.warmup_iters))
            decay = s.gamma ** sum(time.time() - start >= seconds * f for f in (0.75, 0.92))  # steps at 75%, 92%
            for g in opt.param_groups:
                g["lr"] = s.base_lr * s.batch_size / s.reference_batch_size * warm * decay
            loss = sum(step(model, batch).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            iteration += 1
            if time.time() - start >= seconds:
                break
        epoch += 1
    return iteration


@torch.no_grad()
def coco_ap(model, step, cfg, val_set):
    model.eval()
    if hasattr(model, "transform"):  # torchvision resizes inside the model: test at the config's test scale too
        model.transform.min_size, model.transform.max_size = (cfg.data.min_size_test,), cfg.data.max_size_test
    evaluator = COCOEvaluator(val_set.coco, val_set.contiguous_to_cat_id, val_set.class_names)
    sampler = build_batch_sampler(val_set.aspect_ratios(), 8, shuffle=False, seed=0, distributed=False, drop_last=False)
    collate = functools.partial(collate_detection, size_divisibility=cfg.data.size_divisibility)
    for batch in DataLoader(val_set, batch_sampler=sampler, collate_fn=collate):
        dets = step(model, batch)
        evaluator.process(batch["targets"], [to_original(d, t) for d, t in zip(dets, batch["targets"])])
    return evaluator.evaluate()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/frcnn_demo.yaml")
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--backbone", default="", help="backbone checkpoint for both trunks ('' = from scratch)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = [f"model.backbone.weights={args.backbone}", *args.overrides]
    if not args.backbone:  # from scratch: BN must train, nothing frozen
        overrides += ["model.backbone.norm=bn", "model.backbone.freeze_at=0"]
    cfg = load_config(DetConfig, args.config, overrides)
    prepare_data_paths(cfg)
    train_set, val_set = build_datasets(cfg)
    rows = []
    for name, make, step in [("resdet", lambda: build_detector(cfg.model, len(train_set.class_names)), ours_step),
                             ("torchvision parts", lambda: torchvision_parts(cfg, len(train_set.class_names)), tv_step)]:
        torch.manual_seed(cfg.seed)
        model = make()
        iters = train_for(model, step, cfg, train_set, args.seconds)
        metrics = coco_ap(model, step, cfg, val_set)
        rows.append((name, iters, metrics["AP"], metrics["AP50"], metrics["AP75"]))
        print(f"{name}: {iters} iterations, AP {metrics['AP']:.3f} AP50 {metrics['AP50']:.3f}", flush=True)
    init = f"backbone {args.backbone}" if args.backbone else "from scratch"
    print(f"\n{args.config}, {args.seconds:.0f} s of training each, trunk {init}, torch {torch.__version__}")
    print("| detector | iterations | AP | AP50 | AP75 |\n|---|---|---|---|---|")
    for name, iters, ap, ap50, ap75 in rows:
        print(f"| {name} | {iters} | {ap:.3f} | {ap50:.3f} | {ap75:.3f} |")


if __name__ == "__main__":
    main()
