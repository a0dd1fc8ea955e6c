#!/usr/bin/env python
"""resdet's detector on CUDA against the same detector on the CPU, float32, same weights: the losses, the
gradient of every parameter (RoIAlign's backward feeds the trunk's) and the detections of the plain path
(frozen BN as layers, NCHW), the fast path (folded, channels-last) and, on CUDA, the fast path with the
Triton RoIAlign and NMS (``roi_heads.pooler_kernel=triton``, ``nms_kernel=triton``), also with the inference
replayed from a CUDA graph (``eval.cuda_graphs``), each against the plain path on the CPU. Sampling is exhaustive
(every anchor and RoI taken), so no random draw differs between the devices; TF32 is off so the GPU
computes in true float32. The tests check the same on the CPU alone.

    python bench/cuda_check.py          # python bench/cuda_check.py cpu: the script's own dry run
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torchvision.ops import FrozenBatchNorm2d  # noqa: E402

from detection.modeling import DetectorConfig  # noqa: E402
from detection.modeling.build import build_detector  # noqa: E402
from detection.modeling.config import Neck, NMSKernel, RoIAlignKernel  # noqa: E402
from detection.modeling.graphed import GraphedDetector  # noqa: E402


def slim(neck: str, fold: bool, kernel: str = "auto"):
    """``kernel``: RoIAlign's and the RPN's NMS's."""
    cfg = OmegaConf.structured(DetectorConfig)
    cfg.backbone.depth, cfg.backbone.base_width, cfg.backbone.fold_frozen_bn = 50, 16, fold
    cfg.roi_heads.pooler_kernel, cfg.nms_kernel = RoIAlignKernel(kernel), NMSKernel(kernel)
    cfg.neck, cfg.fpn_channels = Neck(neck), 32
    cfg.rpn.anchor_sizes = [16.0, 32.0, 64.0, 128.0, 256.0] if neck == "fpn" else [16.0, 32.0, 64.0]
    cfg.rpn.batch_size_per_image, cfg.roi_heads.batch_size_per_image = 10**6, 10**6  # exhaustive sampling
    cfg.rpn.pre_nms_topk_train = cfg.rpn.pre_nms_topk_test = 300
    cfg.rpn.post_nms_topk_train = cfg.rpn.post_nms_topk_test = 100
    if neck == "fpn":
        cfg.roi_heads.pooler_resolution, cfg.roi_heads.fc_dim = 7, 64
    return cfg


def batch(device, image_sizes=((160, 224), (140, 200))):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (2, 3, 160, 224), dtype=torch.uint8, generator=g)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 90.0, 100.0], [100.0, 30.0, 200.0, 150.0]]),
                "labels": torch.tensor([1, 3]), "crowd_boxes": torch.zeros(0, 4)},
               {"boxes": torch.tensor([[20.0, 40.0, 120.0, 140.0]]), "labels": torch.tensor([2]),
                "crowd_boxes": torch.zeros(0, 4)}]
    return {"images": images.to(device), "image_sizes": list(image_sizes),
            "targets": [{k: v.to(device) for k, v in t.items()} for t in targets]}


def unmatched(dets, reference) -> float:
    """The largest distance (px, max over coordinates) from a detection to the nearest reference detection
    of its class: detections with near-equal scores may come in another order on another device."""
    if not len(dets["boxes"]):
        return 0.0
    dist = (dets["boxes"][:, None] - reference["boxes"][None]).abs().amax(dim=2)
    dist[dets["labels"][:, None] != reference["labels"][None]] = float("inf")
    return dist.amin(dim=1).max().item()


def run(model, device, graphed: bool = False):
    """Losses and gradients of one training step, and the detections; ``graphed``: inference replayed from a
    CUDA graph (``GraphedDetector``), recorded for the same padded shape but other image sizes first, so that
    the answer is a replay's that read the batch's own sizes."""
    model.to(device).train()
    out = model(batch(device))
    sum(out.values()).backward()
    losses = {k: float(v.detach()) for k, v in out.items()}
    grads = torch.cat([p.grad.flatten().cpu() for p in model.parameters() if p.grad is not None])
    model.eval()
    infer = GraphedDetector(model, strict=True) if graphed else model
    with torch.no_grad():
        if graphed:
            infer(batch(device, image_sizes=((150, 210), (160, 190))))
        detections = [{k: v.cpu() for k, v in d.items()} for d in infer(batch(device))]
    return losses, grads, detections


def main():
    device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    worst = 0.0
    for neck in ("none", "fpn"):
        torch.manual_seed(0)
        reference = build_detector(slim(neck, False), num_classes=3)
        with torch.no_grad():
            for m in reference.modules():
                if isinstance(m, FrozenBatchNorm2d):
                    m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                    m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2.0)
        cpu_losses, cpu_grads, cpu_dets = run(reference, "cpu")
        paths = [("plain", False, "auto", False), ("fast", True, "auto", False)]
        if device == "cuda":
            paths += [("fast + Triton RoIAlign and NMS", True, "triton", False),
                      ("fast + Triton, inference as a CUDA graph", True, "triton", True)]
        for name, fast, kernel, graphed in paths:
            model = build_detector(slim(neck, fast, kernel), num_classes=3)
            model.load_state_dict(reference.state_dict())
            if fast:
                model.to(memory_format=torch.channels_last)
            losses, grads, dets = run(model, device, graphed)
            rel = max(abs(losses[k] - cpu_losses[k]) / max(abs(cpu_losses[k]), 1e-6) for k in losses)
            grad_rel = float((grads - cpu_grads).norm() / cpu_grads.norm())
            same_counts = [len(a["boxes"]) for a in dets] == [len(b["boxes"]) for b in cpu_dets]
            box_err = max(unmatched(a, b) for a, b in zip(dets, cpu_dets)) if same_counts else float("inf")
            worst = max(worst, rel, grad_rel)
            print(f"{'C4' if neck == 'none' else 'FPN'} {name} {device} vs CPU: losses rel. diff "
                  f"{rel:.1e} ({', '.join(f'{k} {v:.4f}' for k, v in losses.items())}); gradients rel. diff "
                  f"{grad_rel:.1e}; detections per image {[len(d['boxes']) for d in dets]} vs "
                  f"{[len(d['boxes']) for d in cpu_dets]}, max box diff {box_err:.2e} px")
    print(f"worst loss or gradient difference {worst:.1e}: {'OK' if worst < 1e-3 else 'CHECK'}")


if __name__ == "__main__":
    main()
