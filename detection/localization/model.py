"""The per-class RPN of the paper's localization entry (appendix C) and the classifier it starts from.

Unlike Faster R-CNN's class-agnostic RPN, the cls layer has one binary logistic output per class and
the reg layer one box regressor per class, for every anchor: with A anchors per position and K
classes the head gives A*K logits and A*K*4 deltas (channel ``a*K + k``, deltas ``(a*K + k)*4 + j``).
An image of class c trains only class c's channels: its anchors are labelled by IoU with the image's
class-c boxes (the Matcher), 8 of them sampled at 1:1 positive:negative, a logistic loss on their
class-c logits and a smooth-L1 loss on the positives' class-c deltas. Labelling, sampling and the two
losses are ``detection.modeling.rpn.RPN``'s own, applied to the gathered class-c outputs.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import nn

from backbones.engine.errors import ConfigError
from backbones import (CheckpointError, convert_bn_to_frozen, load_backbone_weights, read_backbone_checkpoint,
                       resnet_from_arch)
from detection.modeling.anchor_generator import AnchorGenerator
from detection.modeling.box_coder import BoxCoder
from detection.modeling.box_ops import clip_boxes
from detection.modeling.matcher import Matcher
from detection.modeling.rpn import RPN, flatten_deltas, flatten_logits
from detection.modeling.trunk import ResNetTrunk


class PerClassRPNHead(nn.Module):
    """Optional 3x3 conv + ReLU, then sibling 1x1 convs: A*K logits and A*K*4 deltas per position."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, conv_channels: int = 256):
        super().__init__()
        self.num_anchors, self.num_classes = num_anchors, num_classes
        self.conv = nn.Conv2d(in_channels, conv_channels, 3, padding=1) if conv_channels else None
        channels = conv_channels or in_channels
        self.cls_logits = nn.Conv2d(channels, num_anchors * num_classes, 1)
        self.bbox_deltas = nn.Conv2d(channels, num_anchors * num_classes * 4, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_deltas):
            if layer is not None:
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) -> logits (N, A*K, H, W), deltas (N, A*K*4, H, W)."""
        if self.conv is not None:
            x = torch.relu(self.conv(x))
        return self.cls_logits(x), self.bbox_deltas(x)


def gather_class(logits: torch.Tensor, deltas: torch.Tensor, classes: torch.Tensor, num_anchors: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One class per image: (N, A*K, H, W), (N, A*K*4, H, W), classes (N,) -> logits (N, H*W*A) and
    deltas (N, H*W*A, 4), flattened in the anchors' (y, x, anchor) order."""
    n, _, h, w = logits.shape
    a = num_anchors
    k = logits.shape[1] // a
    rows = torch.arange(n, device=logits.device)[:, None]
    cols = torch.arange(a, device=logits.device)[None, :]
    cls = classes.to(logits.device)[:, None]
    logits_c = logits.view(n, a, k, h, w)[rows, cols, cls]  # (N, A, H, W)
    deltas_c = deltas.view(n, a, k, 4, h, w)[rows, cols, cls]  # (N, A, 4, H, W)
    return flatten_logits(logits_c), flatten_deltas(deltas_c.reshape(n, a * 4, h, w))


class PerClassRPN(RPN):
    """``RPN`` with a per-class head; ``forward`` gives the losses, ``class_candidates`` the boxes."""

    def forward(self, features: torch.Tensor, labels: torch.Tensor, gt_boxes: Sequence[torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        anchors = self.anchor_generator([features])[0]
        logits, deltas = self.head(features)
        logits_c, deltas_c = gather_class(logits, deltas, labels, self.head.num_anchors)
        sampled, matched = self.label_and_sample_anchors(anchors, [{"boxes": b} for b in gt_boxes])
        losses = self.losses(anchors, logits_c, deltas_c, sampled, matched)
        return {"loss_cls": losses["loss_rpn_cls"], "loss_loc": losses["loss_rpn_loc"]}

    @torch.no_grad()
    def class_candidates(self, features: torch.Tensor, classes: Sequence[int], image_size: tuple[int, int],
                         pre_topk: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One image (features (1, C, H, W)): for each class, its ``pre_topk`` best anchors' boxes (decoded
        with that class's regressor, clipped to the input) and probabilities (sigmoid), best first."""
        anchors = self.anchor_generator([features])[0]
        logits, deltas = self.head(features)
        cls = torch.as_tensor(list(classes), dtype=torch.long, device=features.device)
        n = len(classes)
        logits_c, deltas_c = gather_class(logits.expand(n, -1, -1, -1), deltas.expand(n, -1, -1, -1), cls,
                                          self.head.num_anchors)
        out = []
        for i in range(n):
            scores, idx = logits_c[i].float().topk(min(pre_topk, logits_c.shape[1]))
            boxes = clip_boxes(self.box_coder.decode(deltas_c[i, idx], anchors[idx]), image_size)
            out.append((boxes, scores.sigmoid()))
        return out


class LocalizationNet(nn.Module):
    """The classifier's convolutional trunk (up to ``feature_stage``) with a per-class RPN on top."""

    def __init__(self, resnet: nn.Module, num_classes: int, feature_stage: str = "res5",
                 anchor_sizes: Sequence[float] = (16, 32, 48), aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
                 head_channels: int = 256, anchors_per_image: int = 8, positive_fraction: float = 0.5,
                 iou_thresholds: Sequence[float] = (0.3, 0.7), smooth_l1_beta: float = 1.0 / 9, nms_thresh: float = 0.7):
        super().__init__()
        if feature_stage not in resnet.stage_names[1:]:
            raise ConfigError(f"model.feature_stage must be one of {resnet.stage_names[1:]}, got {feature_stage!r}")
        self.trunk = ResNetTrunk(resnet, [feature_stage])
        self.feature_stage = feature_stage
        generator = AnchorGenerator([[float(s) for s in anchor_sizes]], [[float(r) for r in aspect_ratios]],
                                    [resnet.stage_strides[feature_stage]])
        head = PerClassRPNHead(resnet.stage_channels[feature_stage], generator.num_anchors_per_level[0], num_classes,
                               head_channels)
        self.rpn = PerClassRPN(head, generator, BoxCoder((1.0, 1.0, 1.0, 1.0)),
                               Matcher([float(t) for t in iou_thresholds], [0, -1, 1], allow_low_quality_matches=True),
                               batch_size_per_image=anchors_per_image, positive_fraction=positive_fraction,
                               nms_thresh=nms_thresh, smooth_l1_beta=smooth_l1_beta)
        self.num_classes = num_classes

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)[self.feature_stage]

    def forward(self, images: torch.Tensor, labels: torch.Tensor, gt_boxes: Sequence[torch.Tensor]) -> dict:
        return self.rpn(self.features(images), labels, gt_boxes)


def load_classifier(path: str, fallback_class_names: Sequence[str] = ()) -> tuple[nn.Module, dict, list[str]]:
    """The pretrained classifier (eval mode, frozen), its checkpoint and its class names.

    A torchvision state_dict has no class names: ``fallback_class_names`` (the sorted wnids of the
    dataset) are used then, when their number matches its fc.
    """
    if not path:
        raise CheckpointError("model.classifier is empty: localization starts from a pretrained classifier; "
                              "set model.classifier=<run>/checkpoints/backbone.pth (tools/pretrain_backbone.py writes it)")
    path = os.fspath(path)
    ckpt = read_backbone_checkpoint(path)
    arch = dict(ckpt.get("arch", {}))
    fc = ckpt["state_dict"].get("fc.weight")
    if fc is None or not arch.get("num_classes"):
        raise CheckpointError(f"{path}: a backbone without its classifier (no fc layer); localization needs the "
                              "pretraining's classifier: <pretrain run>/checkpoints/backbone.pth")
    if arch.get("cifar"):
        raise CheckpointError(f"{path}: a CIFAR ResNet (32x32 stem); localization needs an ImageNet-style ResNet")
    names = list(ckpt.get("class_names") or [])
    if not names:
        if len(fallback_class_names) != fc.shape[0]:
            raise CheckpointError(f"{path}: has no class names and {fc.shape[0]} outputs, while the dataset has "
                                  f"{len(fallback_class_names)} classes; use a classifier trained on them")
        names = list(fallback_class_names)
    if len(names) != fc.shape[0]:
        raise CheckpointError(f"{path}: {len(names)} class names for a {fc.shape[0]}-way fc layer; the checkpoint "
                              "is damaged: re-export it with tools/pretrain_backbone.py")
    model = resnet_from_arch(arch, norm="bn")
    load_backbone_weights(model, ckpt, source=path, strict_head=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, ckpt, names


def build_localization_net(model_cfg, classifier_ckpt: dict, num_classes: int, nms_thresh: float = 0.7
                           ) -> LocalizationNet:
    """A LocalizationNet whose trunk starts from the classifier's weights (the paper fine-tunes it)."""
    arch = dict(classifier_ckpt["arch"], num_classes=0)
    resnet = resnet_from_arch(arch, norm="bn", freeze_at=0)
    load_backbone_weights(resnet, classifier_ckpt, source="model.classifier")
    if model_cfg.norm == "frozen_bn":
        convert_bn_to_frozen(resnet)
    elif model_cfg.norm != "bn":
        raise ConfigError(f"model.norm must be bn or frozen_bn, got {model_cfg.norm!r}")
    resnet.freeze(model_cfg.freeze_at)
    return LocalizationNet(resnet, num_classes, model_cfg.feature_stage, list(model_cfg.anchor_sizes),
                           list(model_cfg.aspect_ratios), model_cfg.head_channels, model_cfg.anchors_per_image,
                           model_cfg.positive_fraction, list(model_cfg.iou_thresholds), model_cfg.smooth_l1_beta,
                           nms_thresh)

