"""Faster R-CNN on ResNet backbones: C4 (the ResNet paper's COCO entry) and FPN, one concept per file
(anchors, box coding, matching, sampling, poolers, RPN, RoI heads, test-time additions, post-processing);
``build.py`` assembles it from a ``DetectorConfig``. Imports ``backbones`` (the ResNets, their weights,
config helpers) and ``torchvision.ops``; never the data, evaluation or training code."""
from .anchor_generator import AnchorGenerator
from .box_coder import BoxCoder
from .build import build_backbone, build_detector
from .config import BackboneConfig, DetectorConfig, ROIHeadsConfig, RPNConfig
from .fpn import FPN
from .matcher import Matcher
from .meta_arch import GeneralizedRCNN
from .postprocessing import boxes_to_image, detections_to_image
from .poolers import ROIPooler, assign_boxes_to_levels
from .roi_heads import FastRCNNOutputLayers, Res5ROIHeads, ROIHeads, StandardROIHeads
from .rpn import RPN, RPNHead, filter_proposals
from .sampling import sample_balanced
from .trunk import ResNetTrunk

__all__ = [
    "AnchorGenerator", "BoxCoder", "build_backbone", "build_detector", "BackboneConfig", "DetectorConfig",
    "ROIHeadsConfig", "RPNConfig", "FPN", "Matcher", "GeneralizedRCNN", "ROIPooler", "assign_boxes_to_levels",
    "FastRCNNOutputLayers", "Res5ROIHeads", "ROIHeads", "StandardROIHeads", "RPN", "RPNHead", "filter_proposals",
    "sample_balanced", "ResNetTrunk", "boxes_to_image", "detections_to_image",
]
