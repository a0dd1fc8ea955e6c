"""Schema of the detector (``model:`` in a detection config), as omegaconf structured dataclasses.

The defaults are the ResNet paper's COCO entry: Faster R-CNN on a ResNet-101 "C4" trunk (conv1..res4,
RoI pooling on res4, res5 run per region), backbone BN frozen, stem and res2 frozen. ``neck: fpn``
switches to the FPN variant (RPN over P2..P6, 2-fc box head over P2..P5; set
``roi_heads.pooler_resolution: 7`` for it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from backbones.engine.config import Choice
from backbones.options import Norm, Shortcut


class BoxLoss(Choice):
    smooth_l1 = "smooth_l1"
    l1 = "l1"


class PoolerType(Choice):
    ROIAlignV2 = "ROIAlignV2"  # RoIAlign, aligned (pixel centres at +0.5): Detectron2's default
    ROIAlign = "ROIAlign"  # Mask R-CNN's, without the half-pixel shift
    ROIPool = "ROIPool"  # the paper's


class RoIAlignKernel(Choice):
    auto = "auto"  # CPU: matrix products on small maps, else torchvision's op; CUDA: torchvision's op
    torchvision = "torchvision"  # torchvision.ops.roi_align (float32 NCHW)
    separable = "separable"  # matrix products (detection/modeling/poolers.py)
    triton = "triton"  # CUDA: channels-last, in the features' dtype (detection/modeling/roi_align_triton.py)


class NMSKernel(Choice):
    auto = "auto"  # torchvision's op (in the RPN on the CPU, stopped once post_nms_topk are kept)
    torchvision = "torchvision"  # torchvision.ops.nms: the host waits for each one's output
    triton = "triton"  # CUDA: every image in one launch, no host wait (detection/modeling/nms_triton.py)


class PredictorInit(Choice):
    normal = "normal"  # class scores N(0, 0.01), box deltas N(0, 0.001), zero biases: Fast R-CNN's and Detectron2's
    linear_default = "linear_default"  # PyTorch's nn.Linear default (uniform, +-1/sqrt(fan_in)): torchvision's


class Neck(Choice):
    none = "none"  # C4: RoI pooling on res4, res5 per region
    fpn = "fpn"


@dataclass
class BackboneConfig:
    depth: int = 101  # 18, 34, 50, 101, 152
    base_width: int = 64  # channels of the stem and res2
    shortcut: Shortcut = Shortcut.B
    stride_in_1x1: bool = True  # the paper's layout; torchvision's weights need false
    norm: Norm = Norm.frozen_bn
    freeze_at: int = 2  # 0: train all, 1: freeze stem, 2: stem + res2, ...
    # true: frozen BN applied through its convolution's weights, so it costs no pass over the activations
    # (on an H100 those passes took more GPU time than all the convolutions); same state_dict keys, same
    # results to float rounding. false: the separate layers. Trainable BN is never folded.
    fold_frozen_bn: bool = True
    # A resdet backbone checkpoint or a torchvision ResNet state_dict file; "" = random initialisation.
    weights: str = ""


@dataclass
class RPNConfig:
    # C4: all sizes on the single res4 level. FPN: one size per level, P2..P6 (so exactly five).
    anchor_sizes: list[float] = field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # height / width
    pre_nms_topk_train: int = 12000  # per feature level and image
    post_nms_topk_train: int = 2000  # per image
    pre_nms_topk_test: int = 6000
    post_nms_topk_test: int = 1000
    nms_thresh: float = 0.7
    min_size: float = 0.0  # proposals with a side <= this (pixels) are dropped
    batch_size_per_image: int = 256  # anchors sampled per image for the losses
    positive_fraction: float = 0.5
    iou_thresholds: list[float] = field(default_factory=lambda: [0.3, 0.7])  # below: negative, above: positive
    # Anchors covering >= this fraction of their own area with a crowd box are not used as negatives.
    crowd_ioa_thresh: float = 0.7
    box_loss: BoxLoss = BoxLoss.smooth_l1
    smooth_l1_beta: float = 0.111


@dataclass
class ROIHeadsConfig:
    pooler_type: PoolerType = PoolerType.ROIAlignV2
    pooler_resolution: int = 14  # C4: 14 (res5 halves it to 7); FPN: 7
    pooler_sampling_ratio: int = 0  # 0 = adaptive
    pooler_kernel: RoIAlignKernel = RoIAlignKernel.auto  # the same numbers from each; speed differs
    fc_dim: int = 1024  # FPN box head: two fully connected layers of this width
    batch_size_per_image: int = 512  # RoIs sampled per image for the losses
    positive_fraction: float = 0.25
    fg_iou_thresh: float = 0.5  # IoU >= this: foreground, below: background
    crowd_ioa_thresh: float = 0.7  # background proposals this much inside a crowd box are not sampled
    bbox_reg_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    smooth_l1_beta: float = 0.0  # 0 = L1
    predictor_init: PredictorInit = PredictorInit.normal  # the class-score and box-delta layers
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    # The ResNet paper's global context (appendix B): the whole image pooled as one more RoI through the
    # post-RoI layers, its feature concatenated with each region's before the sibling layers.
    global_context: bool = False


@dataclass
class DetectorConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: Neck = Neck.none
    fpn_channels: int = 256
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi_heads: ROIHeadsConfig = field(default_factory=ROIHeadsConfig)
    # The RPN's and post-processing's NMS: the same boxes from each (equal scores aside); speed differs.
    nms_kernel: NMSKernel = NMSKernel.auto
    # RGB, 0-255 scale. Empty = the backbone checkpoint's normalisation (x 255) when weights are
    # given, else ImageNet's. The values end up as buffers in the detector's state_dict.
    pixel_mean: list[float] = field(default_factory=list)
    pixel_std: list[float] = field(default_factory=list)
