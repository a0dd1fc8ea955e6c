"""Schema of a pretraining run. The defaults ARE the embedded demo: ``python
tools/pretrain_backbone.py`` with no argument trains a slim ResNet-18 on synthetic shapes that it
writes to ``datasets/synthetic_shapes`` on first use. The paper's ImageNet recipe lives in
``configs/pretrain/resnet*_imagenet.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..engine.config import Choice, RunConfig
from ..engine.solver import Schedule, SolverConfig
from ..options import Norm, Shortcut


class Decode(Choice):
    """Where training images are decoded and augmented (evaluation always uses the workers)."""
    workers = "workers"  # OpenCV and albumentations in the DataLoader workers: every recipe
    device = "device"  # nvJPEG and the augmentation on the GPU (device_decode.py): for hosts short of cores


@dataclass
class ModelConfig:
    depth: int = 18  # 18/34/50/101/152; with cifar=true: 6n+2 (20, 32, 44, 56, 110, 1202)
    cifar: bool = False  # the section 4.2 nets (3x3 stem, three stages of 16/32/64 filters)
    plain: bool = False  # no shortcuts: the paper's plain counterparts
    shortcut: Shortcut = Shortcut.B  # A: zero-padding identity, B: projection where shape changes, C: all projection
    base_width: int = 16  # 64 in the paper; 16 trains on a CPU in minutes
    stride_in_1x1: bool = True  # paper/Caffe layout; false = torchvision's (stride in the 3x3)
    zero_init_last_bn: bool = False
    norm: Norm = Norm.bn  # bn | sync_bn (sync_bn across ranks under torchrun)


@dataclass
class DataConfig:
    train_dir: str = "datasets/synthetic_shapes/train"  # ImageFolder: <train_dir>/<class>/<image>
    val_dir: str = "datasets/synthetic_shapes/val"  # "" = hold out val_fraction of train_dir
    val_fraction: float = 0.0
    synthetic: bool = True  # materialise the synthetic shapes dataset at train_dir/val_dir if missing
    synthetic_train_per_class: int = 300
    synthetic_val_per_class: int = 60
    synthetic_image_size: int = 64
    # Scale augmentation (paper: shorter side sampled in [256, 480], random 224 crop, flip).
    scale_range: list[int] = field(default_factory=lambda: [56, 80])
    crop_size: int = 56
    crop_padding: int = 0  # CIFAR recipe: pad 4 px on each side, then the random crop
    test_resize: int = 64  # shorter side before the centre crop at test time (paper: 256)
    flip: bool = True
    pca_lighting_std: float = 0.1  # AlexNet-style PCA colour augmentation; 0 disables
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    workers: int = 2  # DataLoader processes per rank
    # device: the workers only read the files; decoding, resize, crop, flip and colour run on the GPU
    # (the ImageNet recipe; not with crop_padding). Worth it when the workers cannot keep up.
    decode: Decode = Decode.workers
    skip_corrupt: bool = True  # false: a corrupt image is an error instead of skipped and counted


@dataclass
class PretrainSolverConfig(SolverConfig):
    """The shared solver fields (backbones/engine/solver.py) with a schedule counted in epochs."""
    epochs: int = 60
    batch_size: int = 64
    base_lr: float = 0.1
    reference_batch_size: int = 64  # demo: lr 0.1 at batch 64; the paper configs set 256
    nesterov: bool = False
    schedule: Schedule = Schedule.step
    steps: list[int] = field(default_factory=lambda: [45, 55])  # epochs at which lr *= gamma (step)
    # Linear warm-up from 0.1 of the rate. The demo's: without it the width-16 net sat at chance for 10-20
    # epochs and ended anywhere between 70% and 83% top-1 depending on the CPU; with 3 epochs, 78.5-86.3%
    # over 3 seeds and 3 CPU capabilities (README). The paper's recipes (imagenet_base, cifar) set 0.
    warmup_epochs: float = 3.0


@dataclass
class EvalConfig:
    period: int = 5  # epochs between validations (and at the end); 0 = only at the end
    ten_crop: bool = True  # at the end: 10-crop top-1/top-5
    # At the end: the paper's fully-convolutional multi-scale testing (ImageNet: 224..640).
    multiscale_sizes: list[int] = field(default_factory=lambda: [56, 64, 96, 128])
    batch_size: int = 128


@dataclass
class PretrainConfig(RunConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    solver: PretrainSolverConfig = field(default_factory=PretrainSolverConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
