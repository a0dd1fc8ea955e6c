"""Schema of a localization run. The defaults are the CPU demo on synthetic shapes (one shape per
image, written to ``datasets/synthetic_loc`` on first use); ``configs/loc_*.yaml`` hold the paper's
ImageNet recipe and the real-image sample.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from backbones.engine.config import Choice, RunConfig
from backbones.engine.solver import IterationSolverConfig
from backbones.options import Norm
from detection.data.problems import VerifyImages


class Layout(Choice):
    imagefolder = "imagefolder"
    ilsvrc = "ilsvrc"
    synthetic = "synthetic"


class Merge(Choice):
    max = "max"
    vote = "vote"


@dataclass
class LocModelConfig:
    # The pretrained classifier (pretraining's checkpoints/backbone.pth, with its fc and class names).
    # It gives the class guesses at test time and the initial weights of the per-class RPN's trunk.
    classifier: str = ""
    feature_stage: str = "res3"  # the trunk ends here; the RPN head runs on it (res3/4/5: stride 8/16/32)
    head_channels: int = 256  # the RPN's 3x3 conv (512 in Faster R-CNN); 0 = the 1x1 layers sit on the trunk
    anchor_sizes: list[float] = field(default_factory=lambda: [16.0, 32.0, 48.0])  # sqrt(area), pixels of the input
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])  # height / width
    anchors_per_image: int = 32  # paper: 8 anchors sampled per image (the tiny demo needs more signal) ...
    positive_fraction: float = 0.5  # ... at 1:1 positive:negative
    # IoU below: negative anchor, above: positive. Faster R-CNN (and the paper's config): [0.3, 0.7]; the
    # demo's small shapes on a coarse grid get too few positives at 0.7 (0.5 is also the metric's bar).
    iou_thresholds: list[float] = field(default_factory=lambda: [0.3, 0.5])
    smooth_l1_beta: float = 0.1111111111111111
    norm: Norm = Norm.bn  # bn | frozen_bn (the statistics of the classifier, not updated)
    freeze_at: int = 0  # 0: fine-tune everything (the paper); 1: freeze the stem, 2: + res2, ...


@dataclass
class LocDataConfig:
    # imagefolder: <images>/<wnid>/*.JPEG + <annotations>/<stem>.xml (or <annotations>/<wnid>/<stem>.xml)
    # ilsvrc: the official CLS-LOC layout under ilsvrc_root (Data/, Annotations/, LOC_synset_mapping.txt)
    # synthetic: shapes with their boxes, written as an imagefolder at synthetic_root on first use
    layout: Layout = Layout.synthetic
    train_images: str = ""
    train_annotations: str = ""
    val_images: str = ""  # "" = hold out val_fraction of train_images (the pretraining's split function)
    val_annotations: str = ""
    val_fraction: float = 0.2
    holdout_seed: int = 0  # must equal the classifier's pretraining seed so its val images stay unseen
    ilsvrc_root: str = "datasets/ILSVRC"
    synthetic_root: str = "datasets/synthetic_loc"
    synthetic_per_class: int = 100
    synthetic_image_size: int = 64
    # The devkit's data/ILSVRC2015_clsloc_validation_blacklist.txt (one N of ILSVRC2012_val_<N> per line):
    # those val images count for the classification errors only, as the devkit scores them; "" = none
    val_blacklist: str = ""
    skip_unannotated_train: bool = True  # ILSVRC: most train images have no boxes; skip (and count) them
    clip_boxes: bool = False  # true: clip boxes that leave the image instead of stopping with an error
    # Every problem of both splits is listed in one pass at load. strict: then stop; false: drop the records
    # concerned, go on, and count them in summary.json (as detection's data.strict_train / strict_val).
    strict_train: bool = True
    strict_val: bool = True
    # Every image is opened once at load (threads) and checked against the size its XML declares (the boxes
    # are in those pixels): header = size + EXIF orientation, decode = every pixel, none = only when read.
    verify_images: VerifyImages = VerifyImages.header
    # The pretraining's augmentation: shorter side in scale_range, random crop_size crop, flip, PCA colour.
    scale_range: list[int] = field(default_factory=lambda: [64, 80])
    crop_size: int = 56
    flip: bool = True
    pca_lighting_std: float = 0.1
    min_box_visibility: float = 0.3  # a box less visible than this in the crop is dropped from its targets
    workers: int = 2
    skip_corrupt: bool = True


@dataclass
class LocSolverConfig(IterationSolverConfig):
    """The shared solver fields (backbones/engine/solver.py), the per-class RPN's defaults."""
    max_iter: int = 250
    batch_size: int = 32  # paper: 256
    base_lr: float = 0.05
    reference_batch_size: int = 32
    steps: list[int] = field(default_factory=lambda: [200])
    warmup_iters: int = 20


@dataclass
class LocEvalConfig:
    modes: list[str] = field(default_factory=lambda: ["center", "dense"])  # at the end of training
    test_resize: int = 64  # centre: shorter side before the crop_size centre crop (paper: 256 -> 224)
    dense_scales: list[int] = field(default_factory=lambda: [56, 64, 80])  # dense: shorter sides, whole image
    topk: int = 5  # class guesses per image (top-5 error); top-1 uses the first
    iou_thresh: float = 0.5
    pre_nms_topk: int = 200  # per view and class: the candidates that NMS or voting sees
    # How the boxes of all views (and anchors) become one guess per class: "max" = the highest-scoring one
    # after NMS; "vote" = re-score every box by the summed scores of the boxes overlapping it (IoU >=
    # iou_thresh) and average their coordinates (box voting), which favours what several scales agree on.
    merge: Merge = Merge.vote
    nms_thresh: float = 0.7
    period: int = 0  # iterations between centre-crop evaluations during training; 0 = only at the end


@dataclass
class RCNNConfig:
    enabled: bool = False
    proposals_per_image: int = 200  # the per-class RPN's top boxes for a class (paper: 200)
    proposal_scale: int = 64  # training images: shorter side at which the RPN proposes (one scale)
    crop_size: int = 56  # proposals are cropped and warped to this square (paper: 224)
    fg_iou_thresh: float = 0.5
    positive_fraction: float = 0.25
    bbox_reg_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    max_iter: int = 200
    batch_size: int = 64  # RoIs per iteration, total over ranks (paper: 256, RoI-centric)
    base_lr: float = 0.01
    reference_batch_size: int = 64
    steps: list[int] = field(default_factory=lambda: [150])
    warmup_iters: int = 10
    test_topk: int = 0  # 0 = proposals_per_image: RPN boxes re-scored per predicted class at test time


@dataclass
class LocConfig(RunConfig):
    model: LocModelConfig = field(default_factory=LocModelConfig)
    data: LocDataConfig = field(default_factory=LocDataConfig)
    solver: LocSolverConfig = field(default_factory=LocSolverConfig)
    eval: LocEvalConfig = field(default_factory=LocEvalConfig)
    rcnn: RCNNConfig = field(default_factory=RCNNConfig)
    checkpoint_period: int = 100
