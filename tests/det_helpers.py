"""Small shared pieces of the detection tests: random boxes, a slim detector config (as a schema and as tool
overrides), a two-image batch, a tiny C4 RoI head, the data overrides of a synthetic COCO set, and the pairing of
exported detections with PyTorch's, and a Triton kernel compiled for an H100."""
import json
import os
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from omegaconf import OmegaConf

from backbones import build_resnet
from detection.modeling import DetectorConfig, FastRCNNOutputLayers, ROIPooler, Res5ROIHeads
from detection.modeling.config import Neck


def random_boxes(n, size=200.0, min_side=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + min_side
    return torch.cat([xy, xy + wh], dim=1)


def slim_cfg(neck="none", **backbone):
    cfg = OmegaConf.structured(DetectorConfig)
    cfg.backbone.depth = 18
    cfg.backbone.base_width = 8
    for k, v in backbone.items():
        OmegaConf.update(cfg, f"backbone.{k}", v)  # a string for a fixed choice is converted
    cfg.neck = Neck(neck)
    cfg.fpn_channels = 16
    if neck == "fpn":
        cfg.rpn.anchor_sizes = [16.0, 32.0, 64.0, 128.0, 256.0]
        cfg.roi_heads.pooler_resolution = 7
        cfg.roi_heads.fc_dim = 32
    else:
        cfg.rpn.anchor_sizes = [16.0, 32.0, 64.0]
    cfg.rpn.pre_nms_topk_train, cfg.rpn.post_nms_topk_train = 200, 50
    cfg.rpn.pre_nms_topk_test, cfg.rpn.post_nms_topk_test = 200, 50
    cfg.roi_heads.batch_size_per_image = 32
    return cfg


def two_image_batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8, generator=g)
    images[1, :, 80:, :] = 0
    images[1, :, :, 100:] = 0
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 20.0, 120.0, 90.0]]), "labels": torch.tensor([1, 3]),
         "crowd_boxes": torch.zeros(0, 4)},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
         "crowd_boxes": torch.tensor([[0.0, 0.0, 40.0, 40.0]])},
    ]
    return {"images": images, "image_sizes": [(96, 128), (80, 100)], "targets": targets}


def data_overrides(paths, train_on_val=False):
    split = "train" if train_on_val else "val"
    return [f"data.coco.train_images={paths['train_images']}", f"data.coco.train_annotations={paths['train_annotations']}",
            f"data.coco.val_images={paths[split + '_images']}", f"data.coco.val_annotations={paths[split + '_annotations']}"]


# A slim detector that trains from scratch (no pretraining file): trainable BN, nothing frozen.
SLIM = ["model.backbone.depth=18", "model.backbone.base_width=8", "model.backbone.weights=",
        "model.backbone.norm=bn", "model.backbone.freeze_at=0", "model.rpn.anchor_sizes=[16,32,64]",
        "model.rpn.pre_nms_topk_train=300", "model.rpn.post_nms_topk_train=100", "model.rpn.pre_nms_topk_test=300",
        "model.rpn.post_nms_topk_test=50", "model.rpn.batch_size_per_image=64", "model.roi_heads.batch_size_per_image=32",
        "model.roi_heads.pooler_resolution=10", "data.min_size_train=[96]", "data.max_size_train=96",
        "data.min_size_test=96", "data.max_size_test=96", "data.workers=0", "solver.batch_size=4",
        "solver.base_lr=0.02", "solver.reference_batch_size=4", "solver.steps=[1000]", "eval.batch_size=4",
        "log_period=2"]


CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]


def write_dataset(root: Path, images=None, annotations=None, categories=None, make_files=True, **extra) -> tuple:
    """A small COCO dataset on disk: 100x60 (w x h) images, returns (image_dir, ann_file)."""
    images = images if images is not None else [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 60}]
    data = {"images": images, "annotations": annotations or [], "categories": categories or CATEGORIES, **extra}
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    if make_files:
        for img in images:
            pixels = np.random.default_rng(img["id"]).integers(0, 255, (img["height"], img["width"], 3), np.uint8)
            cv2.imwrite(str(image_dir / img["file_name"]), pixels)
    ann_file = root / "instances.json"
    ann_file.write_text(json.dumps(data))
    return image_dir, ann_file


def ann(ann_id, bbox, image_id=1, category_id=1, **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def unmatched_detections(got, expected, score_thresh, box_tol=1.0, score_tol=1e-3):
    """Pair each expected detection with an exported one of the same label, boxes within ``box_tol`` px and
    score within ``score_tol`` (by default 1 px and 1e-3, the tolerance torchvision's export tests use for
    fp32); returns the unmatched expected ones. Extra detections on either side may only be scores within
    ``score_tol`` of the threshold. Pairs rather than compares in order: near-equal scores may swap."""
    got_boxes, got_scores, got_labels = (np.asarray(t) for t in got)
    used, unmatched = set(), []
    for box, score, label in zip(*(np.asarray(t) for t in expected)):
        close = [j for j in range(len(got_boxes)) if j not in used and got_labels[j] == label
                 and np.abs(got_boxes[j] - box).max() <= box_tol and abs(got_scores[j] - score) <= score_tol]
        if close:
            used.add(close[0])
        elif score > score_thresh + score_tol:
            unmatched.append((box, score, label))
    extra = [j for j in range(len(got_boxes)) if j not in used and got_scores[j] > score_thresh + score_tol]
    return unmatched + [(got_boxes[j], got_scores[j], got_labels[j]) for j in extra]


def tiny_res5_head(num_classes=3, **kwargs):
    """A C4 RoI head on a ResNet-18 res5 of width 8 (``ROIHeads`` keyword arguments pass through)."""
    resnet = build_resnet(18, num_classes=0, base_width=8)
    predictor = FastRCNNOutputLayers(resnet.stage_channels["res5"], num_classes)
    return Res5ROIHeads(resnet.res5, ROIPooler(14, [1 / 16]), predictor, "res4", **kwargs)


def compile_for_h100(kernel, types: dict, constants: dict, num_warps: int, multiples_of_16=()) -> tuple[str, str]:
    """A Triton kernel compiled for an H100 (sm_90 cubin; Triton's own ptxas, no GPU needed): ``types`` of its
    arguments (Triton's names: ``*fp32``, ``fp32``; others ``i32``), ``constants`` for its constexprs and the
    arguments a launch specialises, ``multiples_of_16`` the arguments a launch would find divisible by 16
    (pointers, sizes, strides). Returns its SASS and its resource usage (Triton's nvdisasm and cuobjdump)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    names = kernel.arg_names
    signature = {n: "constexpr" if n in constants else types.get(n, "i32") for n in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()},
                       attrs={(names.index(n),): [["tt.divisibility", 16]] for n in multiples_of_16
                              if n not in constants})
    cubin = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["cubin"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        sass, usage = (subprocess.run(command, capture_output=True, text=True, check=True).stdout for command in (
            [triton.knobs.nvidia.nvdisasm.path, path],
            [triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path]))
    return sass, usage
