#!/usr/bin/env python
"""resdet's detector against the same design assembled from torchvision parts: same data, same trunk
weights, same settings, same number of iterations (or the same seconds), several seeds; both scored by
pycocotools. Prints one row per run and a table of mean, spread (sample std) and range per detector.

    python bench/vs_torchvision.py --data imagenette --iters 300 --seeds 0 1 2     # real photos
    python bench/vs_torchvision.py --data coco128 --iters 300 --seeds 0 1 2
    python bench/vs_torchvision.py --data demo --seconds 600                        # the demo, equal time

Data (``--data``):

* ``demo``: the synthetic shapes of ``configs/frcnn_demo.yaml``;
* ``imagenette``: ``../shared/data/imagenette-loc``, 500 real ILSVRC val photos (224x224) with their
  CLS-LOC boxes, 10 classes; 400 train / 100 val, the val images being those the Imagenette pretraining
  config holds out (so its trunk, ``--backbone runs/resnet18_imagenette/checkpoints/backbone.pth
  model.backbone.base_width=32``, has not seen them);
* ``coco128``: ``../shared/data/coco128``, 128 real COCO photos, 80 categories; every 4th image is val
  (96 train / 32 val). Noisy with so few images per class: read it beside the imagenette numbers.

Both real sets are written once as COCO json under ``datasets/parity/`` and read by resdet's own data
pipeline for both detectors (same resize, flips, batches and order). The trunk is
``--backbone`` (default: the pretraining demo's ``runs/pretrain_demo/checkpoints/backbone.pth``; run
``python tools/pretrain_backbone.py`` first), or from scratch with ``--backbone ''``.

torchvision side: ``torchvision.models.detection.FasterRCNN`` (its transform, RPN, RoI heads, losses,
post-processing) on the same slim ResNet trunk (stem..res4) with res5 as the box head. What it fixes
that resdet lets a config choose: RoIAlign with ``aligned=False``, smooth-L1 (beta 1/9) box loss,
PyTorch's default initialisation of the box predictor.

``--variant LABEL=KIND [key=value ...]`` adds a detector (KIND ``resdet`` or ``torchvision``) with config
overrides, for ablations, e.g. ``--variant "resdet-l1=resdet model.roi_heads.smooth_l1_beta=0"``.
The any-class columns score the same detections with every class merged (pycocotools' ``useCats=0``): box
quality without the classification, which is what a "less precise boxes" question asks. ``--json FILE``
writes every run's figures. ``--prepare-only`` writes a real set's json files and prints the
overrides that point a config at it (to train on it with ``tools/train_det.py``).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision.models.detection import FasterRCNN  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor  # noqa: E402
from torchvision.ops import MultiScaleRoIAlign  # noqa: E402

from backbones.engine.config import load_config  # noqa: E402
from backbones.imagedata import scan_image_folder, split_holdout  # noqa: E402
from detection.config import DetConfig  # noqa: E402
from detection.data.batching import build_batch_sampler, collate_detection  # noqa: E402
from detection.data.voc import read_xml_annotation  # noqa: E402
from detection.data.build import build_datasets, prepare_data_paths  # noqa: E402
from detection.evaluation.coco_eval import COCOEvaluator  # noqa: E402
from detection.modeling.build import build_backbone, build_detector  # noqa: E402
from detection.modeling.postprocessing import detections_to_image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
IMAGENETTE_NAMES = {"n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
                    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn",
                    "n03417042": "garbage truck", "n03425413": "gas pump", "n03445777": "golf ball",
                    "n03888257": "parachute"}
# Per data set: the overrides that point the demo config at it and size its images.
DATA_OVERRIDES = {
    "demo": [],
    # 224x224 photos upscaled to 320 (objects are large; the demo trunk saw 64-px shapes)
    "imagenette": ["data.min_size_train=[320]", "data.max_size_train=320", "data.min_size_test=320",
                   "data.max_size_test=320"],
    # 640x480-ish photos: shorter side 320, longer at most 480 (the settings of the pedestrian runs)
    "coco128": ["data.min_size_train=[320]", "data.max_size_train=480", "data.min_size_test=320",
                "data.max_size_test=480"],
}


def _write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def prepare_imagenette(out_dir: str) -> list[str]:
    """imagenette-loc as a COCO detection set: 400 train / 100 val json files; returns the overrides."""
    src = os.path.join(SHARED, "imagenette-loc")
    if not os.path.isdir(src):
        sys.exit(f"--data imagenette needs {src} (the shared sample data)")
    wnids = sorted(IMAGENETTE_NAMES)
    categories = [{"id": i + 1, "name": IMAGENETTE_NAMES[w], "supercategory": w} for i, w in enumerate(wnids)]
    # val = the images configs/pretrain/resnet18_imagenette.yaml holds out (its split, seed 0), so a trunk
    # pretrained there has never seen them
    _, samples = scan_image_folder(os.path.join(src, "images"))
    held_out = {os.path.basename(path) for path, _ in split_holdout(samples, 0.2, 0)[1]}
    files = sorted((os.path.basename(os.path.dirname(p)), os.path.basename(p)) for p, _ in samples)
    splits = {"train": {"images": [], "annotations": [], "categories": categories},
              "val": {"images": [], "annotations": [], "categories": categories}}
    ann_id = 0
    for index, (wnid, name) in enumerate(files):
        split = splits["val" if name in held_out else "train"]
        width, height, objects = read_xml_annotation(os.path.join(src, "annotations", os.path.splitext(name)[0] + ".xml"))
        split["images"].append({"id": index + 1, "file_name": f"{wnid}/{name}", "width": width, "height": height})
        for obj_name, (x1, y1, x2, y2), _ in objects:
            # CLS-LOC coordinates are inclusive pixel indices: the box spans x1 .. x2 + 1
            w, h = min(x2 + 1, width) - x1, min(y2 + 1, height) - y1
            ann_id += 1
            split["annotations"].append({"id": ann_id, "image_id": index + 1, "category_id": wnids.index(obj_name) + 1,
                                         "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0})
    for name, data in splits.items():
        _write_json(os.path.join(out_dir, f"imagenette_{name}.json"), data)
    images = os.path.join(src, "images")
    return [f"data.coco.train_images={images}", f"data.coco.val_images={images}",
            f"data.coco.train_annotations={out_dir}/imagenette_train.json",
            f"data.coco.val_annotations={out_dir}/imagenette_val.json"]


def prepare_coco128(out_dir: str) -> list[str]:
    """coco128 split by image (every 4th to val) into two COCO json files; returns the overrides."""
    src = os.path.join(SHARED, "coco128")
    if not os.path.isdir(src):
        sys.exit(f"--data coco128 needs {src} (the shared sample data)")
    with open(os.path.join(src, "annotations", "instances_train2017.json")) as f:
        coco = json.load(f)
    images = sorted(coco["images"], key=lambda im: im["file_name"])
    val_ids = {im["id"] for i, im in enumerate(images) if i % 4 == 3}
    for name, keep in (("train", lambda i: i not in val_ids), ("val", lambda i: i in val_ids)):
        _write_json(os.path.join(out_dir, f"coco128_{name}.json"), {
            "images": [im for im in images if keep(im["id"])],
            "annotations": [a for a in coco["annotations"] if keep(a["image_id"])],
            "categories": coco["categories"]})
    images_dir = os.path.join(src, "train2017")
    return [f"data.coco.train_images={images_dir}", f"data.coco.val_images={images_dir}",
            f"data.coco.train_annotations={out_dir}/coco128_train.json",
            f"data.coco.val_annotations={out_dir}/coco128_val.json"]


def torchvision_parts(cfg, num_classes: int) -> FasterRCNN:
    # same trunk weights and freezing as ours, with torchvision's FrozenBatchNorm2d as separate layers
    resnet, mean, std = build_backbone(OmegaConf.merge(cfg.model.backbone, {"fold_frozen_bn": False}))
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


def resdet_step(model, batch):
    return model(batch)


def torchvision_step(model, batch):
    # resdet's pipeline already resized the images; torchvision's transform then only normalises and pads
    images = [img[:, :h, :w].float() / 255.0 for img, (h, w) in zip(batch["images"], batch["image_sizes"])]
    if model.training:
        return model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in batch["targets"]])
    return detections_to_image(model(images), batch["targets"])  # to the image files' pixels, as resdet's


COLUMNS = ("AP", "AP50", "AP75", "any-class AP", "any-class AP75")
KINDS = {"resdet": (lambda cfg, k: build_detector(cfg.model, k), resdet_step),
         "torchvision": (torchvision_parts, torchvision_step)}


def train(model, step, cfg, train_set, iters: int, seconds: float) -> tuple[int, float]:
    """SGD with the config's lr, momentum, weight decay and warm-up; lr /10 at 75% and 92% of the budget
    (iterations, or seconds when ``seconds`` > 0). Returns (iterations, seconds)."""
    s = cfg.solver
    params = [p for p in model.parameters() if p.requires_grad]
    lr = s.base_lr * s.batch_size / s.reference_batch_size
    opt = torch.optim.SGD(params, lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)
    sampler = build_batch_sampler(train_set.aspect_ratios(), s.batch_size, shuffle=True, seed=cfg.seed,
                                  distributed=False, drop_last=True)
    collate = functools.partial(collate_detection, size_divisibility=cfg.data.size_divisibility)
    if s.channels_last:  # a setting both detectors get, as the trainer applies it to resdet's
        model.to(memory_format=torch.channels_last)
    model.train()
    iteration, start, epoch = 0, time.time(), 0

    def done() -> float:  # fraction of the budget spent
        return (time.time() - start) / seconds if seconds > 0 else iteration / iters

    while done() < 1:
        sampler.set_epoch(epoch)
        for batch in DataLoader(train_set, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.workers):
            warm = min(1.0, (iteration + 1) / max(1, s.warmup_iters))
            decay = s.gamma ** sum(done() >= f for f in (0.75, 0.92))
            for g in opt.param_groups:
                g["lr"] = lr * warm * decay
            loss = sum(step(model, batch).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            iteration += 1
            if done() >= 1:
                break
        epoch += 1
    return iteration, time.time() - start


@torch.no_grad()
def coco_metrics(model, step, cfg, val_set) -> dict:
    model.eval()
    if isinstance(model, FasterRCNN):  # torchvision resizes inside the model: test at the config's test scale too
        model.transform.min_size, model.transform.max_size = (cfg.data.min_size_test,), cfg.data.max_size_test
    evaluator = COCOEvaluator(val_set.coco, val_set.contiguous_to_cat_id, val_set.class_names, class_agnostic=True)
    sampler = build_batch_sampler(val_set.aspect_ratios(), 8, shuffle=False, seed=0, distributed=False, drop_last=False)
    collate = functools.partial(collate_detection, size_divisibility=cfg.data.size_divisibility)
    for batch in DataLoader(val_set, batch_sampler=sampler, collate_fn=collate):
        detections = step(model, batch)
        evaluator.process(batch["targets"], detections)
    return evaluator.evaluate()


def parse_variant(text: str) -> tuple[str, str, list[str]]:
    head, *overrides = text.split()
    label, _, kind = head.partition("=")
    kind = kind or label
    if kind not in KINDS:
        sys.exit(f"--variant {text!r}: the kind must be one of {sorted(KINDS)} (LABEL=KIND key=value ...)")
    return label, kind, overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(DATA_OVERRIDES), default="demo")
    parser.add_argument("--config", default="configs/frcnn_demo.yaml")
    parser.add_argument("--iters", type=int, default=300, help="training iterations per run (equal iterations)")
    parser.add_argument("--seconds", type=float, default=0, help="> 0: train for this long instead (equal time)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--backbone", default="runs/pretrain_demo/checkpoints/backbone.pth",
                        help="trunk checkpoint for both detectors ('' = from scratch)")
    parser.add_argument("--variant", action="append", default=[],
                        help="LABEL=KIND [key=value ...]; default: resdet and torchvision")
    parser.add_argument("--json", default="", help="write every run's figures here")
    parser.add_argument("--prepare-only", action="store_true",
                        help="write the --data set's json files, print its overrides for tools/ and stop")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides for every detector")
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.backbone and not os.path.isfile(args.backbone):
        sys.exit(f"--backbone {args.backbone}: no such file (run `python tools/pretrain_backbone.py` first, "
                 "or pass --backbone '' to train both from scratch)")
    data = list(DATA_OVERRIDES[args.data])
    if args.data == "imagenette":
        data += prepare_imagenette("datasets/parity")
    elif args.data == "coco128":
        data += prepare_coco128("datasets/parity")
    if args.data != "demo":
        data += ["data.synthetic.enabled=false", "data.workers=1"]
    if args.prepare_only:
        print(" ".join(data))
        return
    trunk = [f"model.backbone.weights={args.backbone}"]
    if not args.backbone:  # from scratch: BN must train, nothing frozen
        trunk += ["model.backbone.norm=bn", "model.backbone.freeze_at=0"]
    variants = [parse_variant(v) for v in (args.variant or ["resdet", "torchvision"])]
    for _, _, extra in variants:  # every variant's overrides, before the first run trains
        load_config(DetConfig, args.config, [*data, *trunk, *args.overrides, *extra])
    budget = f"{args.seconds:.0f} s" if args.seconds > 0 else f"{args.iters} iterations"
    runs = []
    for seed in args.seeds:
        for label, kind, extra in variants:
            cfg = load_config(DetConfig, args.config, [*data, *trunk, f"seed={seed}", *args.overrides, *extra])
            prepare_data_paths(cfg)
            train_set, val_set = build_datasets(cfg)
            make, step = KINDS[kind]
            torch.manual_seed(seed)
            model = make(cfg, len(train_set.class_names))
            iters, secs = train(model, step, cfg, train_set, args.iters, args.seconds)
            m = coco_metrics(model, step, cfg, val_set)
            run = {"detector": label, "seed": seed, "iterations": iters, "seconds": round(secs, 1),
                   **{k: 100 * m[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
                   **{f"any-class {k}": 100 * m["class_agnostic"][k] for k in ("AP", "AP75")}}
            runs.append(run)
            print(f"seed {seed} {label}: {iters} it in {secs:.0f} s, " + ", ".join(
                f"{k} {run[k]:.1f}" for k in COLUMNS), flush=True)
    if args.json:
        _write_json(os.path.abspath(args.json), {"data": args.data, "budget": budget, "seeds": args.seeds,
                                                 "torch": torch.__version__, "runs": runs})
    trunk_name = args.backbone or "from scratch"
    print(f"\n{args.data}, {budget} per run, seeds {args.seeds}, trunk {trunk_name}, torch {torch.__version__}")
    print("AP in %: mean ± sample std over seeds [min, max]; any-class: every class merged (box quality alone)")
    print(f"| detector | iterations | {' | '.join(COLUMNS)} |\n|---|---|{'---|' * len(COLUMNS)}")
    for label, _, _ in variants:
        mine = [r for r in runs if r["detector"] == label]
        cells = []
        for key in COLUMNS:
            values = [r[key] for r in mine]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {sd:.1f} [{min(values):.1f}, {max(values):.1f}]")
        its = statistics.mean(r["iterations"] for r in mine)
        print(f"| {label} | {its:.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
