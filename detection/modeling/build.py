"""Build the detector a ``DetectorConfig`` describes.

``C4`` (``neck: none``, the ResNet paper's design): trunk stem..res4, RPN on res4 (stride 16) with all
anchor sizes there, RoI features pooled from res4 and run through res5.
``FPN`` (``neck: fpn``): trunk stem..res5, FPN P2..P6, one anchor size per level, RoI features from
P2..P5 and a 2-fc box head.

Backbone weights (``backbone.weights``) are loaded into a plain-BN ResNet first; then ``norm`` is
applied (``frozen_bn`` turns every BatchNorm into FrozenBatchNorm2d holding the loaded statistics,
so they never update) and ``freeze_at`` stops gradients into the first stages.
"""
from __future__ import annotations

import os

from backbones.engine.errors import ConfigError
from backbones import (CheckpointError, build_resnet, convert_bn_to_frozen, load_backbone_weights,
                       read_backbone_checkpoint)
from backbones.checkpoint import IMAGENET_MEAN, IMAGENET_STD
from backbones.resnet import IMAGENET_DEPTHS, ResNet, fold_frozen_bn

from .anchor_generator import AnchorGenerator
from .box_coder import BoxCoder
from .fpn import FPN
from .matcher import Matcher
from .meta_arch import GeneralizedRCNN
from .poolers import ROIPooler
from .roi_heads import FastRCNNOutputLayers, Res5ROIHeads, StandardROIHeads
from .rpn import RPN, RPNHead
from .trunk import ResNetTrunk

NECKS = ("none", "fpn")


def _floats(values) -> list[float]:
    return [float(v) for v in values]


def _check_arch(cfg, arch: dict, path: str) -> None:
    """Compare the config's backbone options with a checkpoint's architecture, naming every difference."""
    block, stage_blocks = IMAGENET_DEPTHS[cfg.depth]
    differ = []
    if arch.get("block") != block or list(arch.get("stage_blocks", [])) != list(stage_blocks):
        depth = next((d for d, (b, s) in IMAGENET_DEPTHS.items()
                      if b == arch.get("block") and list(s) == list(arch.get("stage_blocks", []))), None)
        found = f"depth {depth}" if depth else f"block {arch.get('block')!r}, stage_blocks {arch.get('stage_blocks')}"
        differ.append(f"depth: config {cfg.depth} vs checkpoint {found}")
    for key in ("base_width", "shortcut", "stride_in_1x1"):
        if key in arch and arch[key] != getattr(cfg, key):
            differ.append(f"{key}: config {getattr(cfg, key)!r} vs checkpoint {arch[key]!r}")
    if arch.get("cifar"):
        differ.append("the checkpoint is a CIFAR ResNet (32x32 stem), not an ImageNet one")
    if differ:
        raise CheckpointError(f"{path}: backbone checkpoint does not match model.backbone ("
                              + "; ".join(differ) + "); set model.backbone.* to the checkpoint's architecture")


def unnormalised_backbone(cfg) -> str | None:
    """What is wrong with frozen BatchNorm without weights (``cfg``: a ``BackboneConfig``), else None. Frozen
    BN keeps the statistics of the weights it is loaded with; with none it is the identity, so a random network
    is not normalised at all: the paper's R101-C4 config from scratch reached a loss of 4e4 at its first step
    and NaN at its third. Shallower ones may train (speed benches do it on purpose), so the trainer warns and
    names it when the loss diverges rather than refusing."""
    if cfg.norm == "frozen_bn" and not cfg.weights:
        return ("model.backbone.norm=frozen_bn without model.backbone.weights: frozen BatchNorm keeps the loaded "
                "weights' statistics, and with none a random network is not normalised; fix: "
                "model.backbone.weights=PATH (python tools/pretrain_backbone.py writes one), or train from scratch "
                "with model.backbone.norm=bn model.backbone.freeze_at=0")
    return None


def build_backbone(cfg) -> tuple[ResNet, list[float], list[float]]:
    """The ResNet of ``cfg`` (a ``BackboneConfig``), weights loaded, norm and freezing applied, plus the
    pixel mean/std (RGB, 0-255) its weights expect."""
    if cfg.depth not in IMAGENET_DEPTHS:
        raise ConfigError(f"model.backbone.depth must be one of {sorted(IMAGENET_DEPTHS)}, got {cfg.depth}")
    if cfg.norm not in ("bn", "frozen_bn", "sync_bn"):
        raise ConfigError(f"model.backbone.norm must be bn, frozen_bn or sync_bn, got {cfg.norm!r}")
    norm = "bn" if cfg.norm == "frozen_bn" else cfg.norm
    resnet = build_resnet(cfg.depth, num_classes=0, shortcut=cfg.shortcut, base_width=cfg.base_width,
                          stride_in_1x1=cfg.stride_in_1x1, norm=norm, freeze_at=0)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if cfg.weights:
        path = os.fspath(cfg.weights)
        checkpoint = read_backbone_checkpoint(path)
        _check_arch(cfg, checkpoint.get("arch", {}), path)
        load_backbone_weights(resnet, checkpoint, source=path)
        normalization = checkpoint.get("normalization") or {}
        mean, std = normalization.get("mean", mean), normalization.get("std", std)
    if cfg.norm == "frozen_bn":
        convert_bn_to_frozen(resnet)
    resnet.freeze(cfg.freeze_at)
    if cfg.fold_frozen_bn:
        fold_frozen_bn(resnet)
    return resnet, [255.0 * float(m) for m in mean], [255.0 * float(s) for s in std]


# Feature strides of an ImageNet ResNet's stages (the stem divides by 4, each later stage by 2).
C4_STRIDE = 16
FPN_STRIDES = (4, 8, 16, 32, 64)  # P2..P6


def build_anchor_generator(model_cfg) -> AnchorGenerator:
    """The RPN's anchors: C4 puts every size on res4 (stride 16); FPN one size per level, P2..P6."""
    if model_cfg.neck not in NECKS:
        raise ConfigError(f"model.neck must be one of {NECKS}, got {model_cfg.neck!r}")
    sizes, ratios = _floats(model_cfg.rpn.anchor_sizes), _floats(model_cfg.rpn.aspect_ratios)
    if model_cfg.neck == "fpn":
        if len(sizes) != len(FPN_STRIDES):
            raise ConfigError(f"model.rpn.anchor_sizes: FPN takes one size per level ['p2', 'p3', 'p4', 'p5', 'p6'], "
                             f"got {len(sizes)} sizes {sizes}")
        return AnchorGenerator([[s] for s in sizes], [ratios], list(FPN_STRIDES))
    return AnchorGenerator([sizes], [ratios], [C4_STRIDE])


def build_detector(model_cfg, num_classes: int) -> GeneralizedRCNN:
    """A Faster R-CNN for ``num_classes`` object classes (labels 1..K; 0 is background)."""
    if model_cfg.neck not in NECKS:
        raise ConfigError(f"model.neck must be one of {NECKS}, got {model_cfg.neck!r}")
    resnet, mean, std = build_backbone(model_cfg.backbone)
    if len(model_cfg.pixel_mean):
        mean = _floats(model_cfg.pixel_mean)
    if len(model_cfg.pixel_std):
        std = _floats(model_cfg.pixel_std)
    r, h = model_cfg.rpn, model_cfg.roi_heads
    anchor_generator = build_anchor_generator(model_cfg)
    if model_cfg.neck == "fpn":
        stages = ["res2", "res3", "res4", "res5"]
        trunk = ResNetTrunk(resnet, stages)
        neck = FPN({s: resnet.stage_channels[s] for s in stages}, model_cfg.fpn_channels)
        strides = [resnet.stage_strides[s] for s in stages] + [2 * resnet.stage_strides[stages[-1]]]
        assert strides == anchor_generator.strides, (strides, anchor_generator.strides)
        rpn_in_channels = model_cfg.fpn_channels
    else:
        trunk = ResNetTrunk(resnet, ["res4"])
        neck = None
        rpn_in_channels = resnet.stage_channels["res4"]

    rpn = RPN(
        RPNHead(rpn_in_channels, anchor_generator.num_anchors_per_level[0]),
        anchor_generator,
        BoxCoder((1.0, 1.0, 1.0, 1.0)),
        Matcher(_floats(r.iou_thresholds), [0, -1, 1], allow_low_quality_matches=True),
        batch_size_per_image=r.batch_size_per_image,
        positive_fraction=r.positive_fraction,
        pre_nms_topk_train=r.pre_nms_topk_train,
        post_nms_topk_train=r.post_nms_topk_train,
        pre_nms_topk_test=r.pre_nms_topk_test,
        post_nms_topk_test=r.post_nms_topk_test,
        nms_thresh=r.nms_thresh,
        nms_kernel=str(model_cfg.nms_kernel),
        min_size=r.min_size,
        loss=r.box_loss,
        smooth_l1_beta=r.smooth_l1_beta,
        crowd_ioa_thresh=r.crowd_ioa_thresh,
    )

    head_kwargs = dict(batch_size_per_image=h.batch_size_per_image, positive_fraction=h.positive_fraction,
                       fg_iou_thresh=h.fg_iou_thresh, crowd_ioa_thresh=h.crowd_ioa_thresh,
                       global_context=h.global_context)
    context_factor = 2 if h.global_context else 1  # the sibling layers see [region, whole image]

    def predictor(in_features: int) -> FastRCNNOutputLayers:
        return FastRCNNOutputLayers(in_features, num_classes, BoxCoder(_floats(h.bbox_reg_weights)),
                                    smooth_l1_beta=h.smooth_l1_beta, score_thresh=h.score_thresh,
                                    nms_thresh=h.nms_thresh, detections_per_img=h.detections_per_img,
                                    init=str(h.predictor_init), nms_kernel=str(model_cfg.nms_kernel))

    if neck is not None:
        levels = neck.out_features[:4]  # P2..P5; P6 is for the RPN only
        pooler = ROIPooler(h.pooler_resolution, [1.0 / s for s in strides[:4]], h.pooler_sampling_ratio, h.pooler_type,
                           kernel=h.pooler_kernel)
        roi_heads = StandardROIHeads(pooler, predictor(context_factor * h.fc_dim), levels, model_cfg.fpn_channels,
                                     fc_dim=h.fc_dim, **head_kwargs)
    else:
        pooler = ROIPooler(h.pooler_resolution, [1.0 / resnet.stage_strides["res4"]], h.pooler_sampling_ratio,
                           h.pooler_type, kernel=h.pooler_kernel)
        roi_heads = Res5ROIHeads(resnet.res5, pooler, predictor(context_factor * resnet.stage_channels["res5"]), "res4",
                                 **head_kwargs)

    return GeneralizedRCNN(trunk, rpn, roi_heads, mean, std, neck=neck)
