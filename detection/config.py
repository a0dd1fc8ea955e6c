"""Schema of a detection run (model, data, solver, evaluation).

The defaults are the paper's COCO settings for data and solver (appendix A: shorter side 600,
8 images per batch, lr 0.001 for 240k iterations then 0.0001 for 80k); ``configs/*.yaml`` pick
the depth, the neck and the schedule, and ``configs/frcnn_demo.yaml`` shrinks everything so the
same code runs on a laptop CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from backbones.engine.config import Choice, RunConfig
from backbones.engine.solver import CompileMode, IterationSolverConfig

from .data.problems import VerifyImages
from .modeling.config import DetectorConfig


class DataFormat(Choice):
    coco = "coco"  # a COCO json per split
    voc = "voc"  # PASCAL VOC XML folders
    imagenet_det = "imagenet_det"  # ILSVRC DET XML


class Difficult(Choice):
    ignore = "ignore"  # like crowd regions: neither positive nor negative
    train = "train"
    drop = "drop"


class VocMetric(Choice):
    auto = "auto"
    voc07 = "voc07"
    area = "area"


@dataclass
class CocoDataConfig:
    """``format: coco``: one COCO json per split, and the folder its ``file_name``s are relative to."""
    train_images: str = "datasets/coco/train2017"
    train_annotations: str = "datasets/coco/annotations/instances_train2017.json"
    val_images: str = "datasets/coco/val2017"
    val_annotations: str = "datasets/coco/annotations/instances_val2017.json"


@dataclass
class XmlDataConfig:
    """``format: voc | imagenet_det``: XML datasets given as ``ROOT:SPLIT`` sets (detection/data/voc.py), e.g.
    ``datasets/VOCdevkit/VOC2007:trainval`` or ``datasets/ILSVRC:val``."""
    train_sets: list[str] = field(default_factory=list)  # concatenated (VOC 07+12)
    val_sets: list[str] = field(default_factory=list)
    # the XML <name>s in label order; [] = the 20 VOC classes (voc), the synsets file's wnids sorted, or
    # without one every wnid in the sets sorted (imagenet_det)
    class_names: list[str] = field(default_factory=list)
    synsets_file: str = ""  # imagenet_det: "wnid [index] name" lines (devkit data/map_det.txt): class names
    # imagenet_det: the devkit's data/ILSVRC2015_det_validation_blacklist.txt ("<val.txt index> <wnid>"
    # lines): each listed class is not scored in that val image, as the devkit's eval_detection; "" = none
    val_blacklist: str = ""
    # VOC difficult objects in training: ignore (like crowd) | train | drop
    train_difficult: Difficult = Difficult.ignore


@dataclass
class SyntheticDataConfig:
    """Synthetic shapes written on first use in the layout of ``data.format`` (the demo; no download): COCO
    json at ``root``, the XML layouts at ``<root>_<format>``. ``enabled`` replaces ``data.coco`` /
    ``data.xml`` paths with the written ones."""
    enabled: bool = False
    root: str = "datasets/synthetic_coco"
    num_train: int = 1500
    num_val: int = 200
    image_size: int = 128


@dataclass
class DetDataConfig:
    """What to read (``format`` and its group: ``coco``, ``xml``, or ``synthetic`` shapes in that format's
    layout), at which input sizes, and how loading treats problems."""
    format: DataFormat = DataFormat.coco
    coco: CocoDataConfig = field(default_factory=CocoDataConfig)
    xml: XmlDataConfig = field(default_factory=XmlDataConfig)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    # input sizes
    min_size_train: list[int] = field(default_factory=lambda: [600])  # several = multi-scale training
    max_size_train: int = 1000
    min_size_test: int = 600
    max_size_test: int = 1000
    flip_prob: float = 0.5
    size_divisibility: int = 32
    # loading
    filter_empty_train: bool = True  # images without boxes teach the RPN nothing in Faster R-CNN
    # loader worker processes per rank; rank 0 also scores a COCO evaluation's categories in as many (pycocotools
    # alone is one core: 48-53 s for a val2017-sized set on a 2-core EPYC, 27 s in 2; bench/coco_eval_speed.py)
    workers: int = 4
    skip_corrupt: bool = True  # an image that fails to decode mid-epoch is skipped and counted (else an error)
    # Every problem of a set is listed in one pass at load. strict: then stop; false: drop the bad records and
    # images, go on, and count them in summary.json. Evaluation sets stay strict unless you say otherwise.
    strict_train: bool = True
    strict_val: bool = True
    # Every image is opened once at load (threads): header = size + EXIF orientation (fast), decode = every
    # pixel (also finds truncated files), none = only when read (then skipped mid-epoch).
    verify_images: VerifyImages = VerifyImages.header


@dataclass
class DetSolverConfig(IterationSolverConfig):
    """The shared solver fields (backbones/engine/solver.py) with the paper's COCO defaults, and a
    schedule that may count epochs instead."""
    max_iter: int = 320000
    base_lr: float = 0.001
    steps: list[int] = field(default_factory=lambda: [240000])
    # > 0: the schedule counts epochs of the training set (small data sets, where iterations mean little
    # until the set's size is known): max_iter = epochs x iterations per epoch, steps from step_epochs,
    # eval.period from eval.period_epochs; the resolved config.yaml holds the iterations it came to.
    epochs: int = 0
    step_epochs: list[float] = field(default_factory=list)  # with epochs: lr *= gamma after these epochs


@dataclass
class DetEvalConfig:
    period: int = 20000  # iterations between COCO evaluations (and at the end); 0 = only at the end
    period_epochs: int = 0  # with solver.epochs: evaluate every this many epochs instead (best.pth keeps the best AP)
    batch_size: int = 8
    # voc/imagenet_det: which mAP@0.5 is metrics["AP"] (and picks best.pth): voc07 (11-point, how VOC2007
    # test is scored) | area (VOC2010+, ImageNet DET) | auto (voc07 when every val set is a VOC2007 one).
    voc_metric: VocMetric = VocMetric.auto
    coco_metrics: bool = True  # voc/imagenet_det: also pycocotools' metrics (difficult = crowd), under "coco"
    # false: every image of the val set is scored, an unreadable one as an image without detections (the
    # count is in the metrics and the table). true: only the images that were read (a deliberate subset).
    only_processed_images: bool = False
    # Test-time additions of the ResNet paper's COCO entry (appendix B); all off = the plain detector.
    box_refinement: bool = False  # re-score the regressed boxes, merge, NMS at refinement_nms_thresh, vote
    refinement_nms_thresh: float = 0.3
    box_voting_iou: float = 0.5  # box voting after refinement; 0 = off
    test_scales: list[int] = field(default_factory=list)  # multi-scale testing (paper: 200..1000); [] = off
    flip: bool = False  # horizontal-flip testing
    # torch.compile the trunk, neck, RPN convolutions and box head for evaluation, eval_det.py and Predictor (a
    # training run with solver.compile evaluates its compiled model either way)
    compile: bool = False
    # with compile: reduce_overhead adds CUDA graphs (a GPU's latency at batch 1 is mostly kernel launches),
    # one per input size, each holding its outputs until the next call, so not with the test-time options
    # above (they keep several views' features at once); max_autotune searches kernels (long to compile)
    compile_mode: CompileMode = CompileMode.default
    # eval_det.py and Predictor on CUDA: the whole inference replayed as one CUDA graph per padded batch shape
    # (detection/modeling/graphed.py); takes model.nms_kernel=triton (no host wait inside; auto becomes it),
    # not with the test-time options or compile_mode=reduce_overhead. Evaluation during training stays eager
    # (the weights change).
    cuda_graphs: bool = False


@dataclass
class DetConfig(RunConfig):
    # keys of older configs (run folders' config.yaml too): read at their new place, with a warning
    MOVED_KEYS: ClassVar[dict[str, str]] = {
        **{f"data.{k}": f"data.coco.{k}" for k in ("train_images", "train_annotations", "val_images",
                                                     "val_annotations")},
        **{f"data.{k}": f"data.xml.{k}" for k in ("train_sets", "val_sets", "class_names", "synsets_file",
                                                    "train_difficult")},
        "data.synthetic": "data.synthetic.enabled",
        **{f"data.synthetic_{k}": f"data.synthetic.{k}" for k in ("root", "num_train", "num_val", "image_size")},
    }
    model: DetectorConfig = field(default_factory=DetectorConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    solver: DetSolverConfig = field(default_factory=DetSolverConfig)
    eval: DetEvalConfig = field(default_factory=DetEvalConfig)
    checkpoint_period: int = 5000
