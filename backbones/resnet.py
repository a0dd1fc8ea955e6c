"""The ResNet family of He et al. (CVPR 2016), in one file.

Everything the paper varies is a plain constructor argument:

* ``block``: ``"basic"`` (two 3x3 convs, ResNet-18/34, CIFAR nets) or ``"bottleneck"`` (1x1-3x3-1x1,
  ResNet-50/101/152).
* ``shortcut``: ``"A"`` zero-padding identity (no parameters), ``"B"`` projection only where the shape
  changes, ``"C"`` projection everywhere, ``"none"`` for the paper's *plain* counterparts.
* ``stride_in_1x1``: the paper (and Caffe's released models) downsample in the first 1x1 of a
  bottleneck; torchvision moved the stride to the 3x3 ("ResNet v1.5"). Parameters are identical,
  multiply-adds are not (ResNet-50: 3.86 G vs 4.09 G).
* ``base_width``: channels of the stem and of res2 (64 in the paper); 16 gives slim nets that train
  on a CPU in minutes, which is what the demos and tests use. Below 16, a strided 1x1 convolution
  subsamples its input and then convolves with unit stride (``STRIDED_1X1_MIN_CHANNELS``: a oneDNN bug).
* ``zero_init_last_bn``: start every residual branch as zero (Goyal et al.), off by default.
* ``norm``: ``"bn"``, ``"frozen_bn"`` (fine-tuning detection, as the paper did) or ``"sync_bn"``.

Stages are named as in the paper's Table 1 and in Detectron2: ``stem`` (conv1 + max pool, stride 4),
``res2`` .. ``res5`` (strides 4, 8, 16, 32), so a detector can use stem..res4 as its trunk and run res5
per region of interest.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

STAGE_NAMES = ("stem", "res2", "res3", "res4", "res5")

# Blocks per stage, Table 1 of the paper.
IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
SHORTCUTS = ("A", "B", "C", "none")
NORMS = ("bn", "frozen_bn", "sync_bn")


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "frozen_bn":
        return FrozenBatchNorm2d(channels)
    if kind == "sync_bn":
        return nn.SyncBatchNorm(channels)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


# oneDNN (PyTorch's CPU convolutions) gets the weight gradient of a strided 1x1 convolution on channels-last
# input wrong when the input has fewer channels than its kernel's channel block (16 with AVX-512, 8 with
# AVX2): it writes past a workspace, so the heap is corrupted and the process crashes or the gradients are
# wrong (uxlfoundation/oneDNN#6035, open; with torch 2.14.1 on AVX-512 EPYCs, a ResNet-18 of base_width 8
# crashed in its first backward pass at 160x256). Only nets narrower than this have such a convolution (the
# tests' slim nets), and there the input is subsampled first and convolved with unit stride: the same sums.
STRIDED_1X1_MIN_CHANNELS = 16


def strided_1x1_input_step(in_channels: int, stride: int) -> int:
    """By how much a strided 1x1 convolution's input is subsampled before a unit-stride convolution:
    ``stride`` below ``STRIDED_1X1_MIN_CHANNELS`` channels (the oneDNN bug above), else 1 (the convolution
    keeps its stride)."""
    return stride if stride > 1 and in_channels < STRIDED_1X1_MIN_CHANNELS else 1


def subsample(x: torch.Tensor, step: int) -> torch.Tensor:
    return x[:, :, ::step, ::step] if step > 1 else x


class ZeroPadShortcut(nn.Module):
    """Option A: identity with spatial subsampling and zero-filled extra channels (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.extra_channels = out_channels - in_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = subsample(x, self.stride)
        if self.extra_channels:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))
        return x


class ProjectionShortcut(nn.Module):
    """Options B/C: 1x1 convolution (with stride) followed by normalisation."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str):
        super().__init__()
        self.input_step = strided_1x1_input_step(in_channels, stride)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride // self.input_step, bias=False)
        self.bn = make_norm(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(subsample(x, self.input_step)))


def make_shortcut(kind: str, in_channels: int, out_channels: int, stride: int, norm: str) -> nn.Module | None:
    """``None`` means no shortcut at all (plain network)."""
    if kind == "none":
        return None
    shape_changes = stride != 1 or in_channels != out_channels
    if kind == "C" or (kind == "B" and shape_changes):
        return ProjectionShortcut(in_channels, out_channels, stride, norm)
    if kind in ("A", "B"):
        return ZeroPadShortcut(in_channels, out_channels, stride) if shape_changes else nn.Identity()
    raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {kind!r}")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR nets)."""

    expansion = 1

    def __init__(self, in_channels, width, stride=1, shortcut="B", norm="bn", stride_in_1x1=True):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, width)
        self.conv2 = nn.Conv2d(width, out_channels, 3, padding=1, bias=False)
        self.bn2 = make_norm(norm, out_channels)
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride, norm)

    def last_norm(self) -> nn.Module:
        return self.bn2

    def input_read_step(self) -> int:
        """1: the first 3x3 convolution reads every position of the input (see Bottleneck's)."""
        return 1

    def forward(self, x):
        # in place: each result is a fresh tensor that no backward pass needs (conv and BN keep their
        # inputs), so the ReLU and the sum write over it instead of allocating another map
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            out += self.shortcut(x)
        return F.relu(out, inplace=True)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand by 4 (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, in_channels, width, stride=1, shortcut="B", norm="bn", stride_in_1x1=True):
        super().__init__()
        out_channels = width * self.expansion
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.input_step = strided_1x1_input_step(in_channels, stride_1x1)  # see STRIDED_1X1_MIN_CHANNELS
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=stride_1x1 // self.input_step, bias=False)
        self.bn1 = make_norm(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride_3x3, padding=1, bias=False)
        self.bn2 = make_norm(norm, width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = make_norm(norm, out_channels)
        self.shortcut = make_shortcut(shortcut, in_channels, out_channels, stride, norm)

    def last_norm(self) -> nn.Module:
        return self.bn3

    def input_read_step(self) -> int:
        """How sparsely the block reads its input. In the paper's layout a strided block starts every path
        with a 1x1 convolution (or a subsampling) of its stride, so it reads only every ``stride``-th row
        and column and the rest of the input is never used; a caller can then compute only those positions
        (the C4 head pools a quarter of the RoI bins) and hand them over (:meth:`take_subsampled_input`).
        1 where something reads every position (the strided 3x3 of torchvision's layout, an identity)."""
        step = self.conv1.stride[0] * self.input_step
        if isinstance(self.shortcut, ProjectionShortcut):
            shortcut_step = self.shortcut.conv.stride[0] * self.shortcut.input_step
        elif isinstance(self.shortcut, ZeroPadShortcut):
            shortcut_step = self.shortcut.stride
        elif self.shortcut is None:
            shortcut_step = step
        else:
            shortcut_step = 1
        return step if step == shortcut_step else 1

    def take_subsampled_input(self) -> None:
        """From here on the block takes its input already subsampled by :meth:`input_read_step` and runs its
        first 1x1 and its shortcut with unit stride: the same outputs for that input, the same parameters
        and state_dict. The block is changed in place: the owner that calls this feeds it (Res5ROIHeads)."""
        if self.input_read_step() == 1:
            return
        self.conv1.stride, self.input_step = (1, 1), 1
        if isinstance(self.shortcut, ProjectionShortcut):
            self.shortcut.conv.stride, self.shortcut.input_step = (1, 1), 1
        elif isinstance(self.shortcut, ZeroPadShortcut):
            self.shortcut.stride = 1

    def forward(self, x):
        # in place, as in BasicBlock
        out = F.relu(self.bn1(self.conv1(subsample(x, self.input_step))), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        if self.shortcut is not None:
            out += self.shortcut(x)
        return F.relu(out, inplace=True)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


def make_stage(block: str, in_channels: int, width: int, num_blocks: int, stride: int, **block_kwargs) -> nn.Sequential:
    """A stage: the first block changes stride/width, the rest keep them. Children are named 0..n-1."""
    cls = BLOCKS[block]
    blocks = []
    for i in range(num_blocks):
        blocks.append(cls(in_channels, width, stride if i == 0 else 1, **block_kwargs))
        in_channels = width * cls.expansion
    return nn.Sequential(*blocks)


class ImageNetStem(nn.Sequential):
    """conv1 of Table 1: 7x7/2 convolution, normalisation, ReLU, 3x3/2 max pooling (stride 4)."""

    def __init__(self, out_channels: int, norm: str):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(3, out_channels, 7, stride=2, padding=3, bias=False),
            bn=make_norm(norm, out_channels),
            relu=nn.ReLU(inplace=True),
            pool=nn.MaxPool2d(3, stride=2, padding=1),
        ))


class CifarStem(nn.Sequential):
    """Section 4.2: a single 3x3 convolution on 32x32 inputs (stride 1)."""

    def __init__(self, out_channels: int, norm: str):
        super().__init__(OrderedDict(
            conv=nn.Conv2d(3, out_channels, 3, padding=1, bias=False),
            bn=make_norm(norm, out_channels),
            relu=nn.ReLU(inplace=True),
        ))


class ResNet(nn.Module):
    """A ResNet of named stages followed by global average pooling and a classifier.

    ``num_classes=0`` drops the classifier (a pure feature extractor).
    """

    def __init__(
        self,
        block: str = "bottleneck",
        stage_blocks: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 1000,
        shortcut: str = "B",
        base_width: int = 64,
        stride_in_1x1: bool = True,
        zero_init_last_bn: bool = False,
        norm: str = "bn",
        freeze_at: int = 0,
        cifar: bool = False,
    ):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {tuple(BLOCKS)}, got {block!r}")
        # config enums arrive as str subclasses; arch goes into checkpoints read with weights_only: plain str
        shortcut, norm = str(shortcut), str(norm)
        self.arch = dict(
            block=block, stage_blocks=list(stage_blocks), shortcut=shortcut, base_width=base_width,
            stride_in_1x1=stride_in_1x1, cifar=cifar,
        )
        expansion = BLOCKS[block].expansion
        self.stem = (CifarStem if cifar else ImageNetStem)(base_width, norm)
        self.stage_names = ["stem"]
        self.stage_channels = {"stem": base_width}
        self.stage_strides = {"stem": 1 if cifar else 4}
        in_channels, stride_total = base_width, self.stage_strides["stem"]
        block_kwargs = dict(shortcut=shortcut, norm=norm, stride_in_1x1=stride_in_1x1)
        for i, num_blocks in enumerate(stage_blocks):
            name = f"res{i + 2}"
            width = base_width * 2**i
            stride = 1 if i == 0 else 2
            self.add_module(name, make_stage(block, in_channels, width, num_blocks, stride, **block_kwargs))
            in_channels = width * expansion
            stride_total *= stride
            self.stage_names.append(name)
            self.stage_channels[name] = in_channels
            self.stage_strides[name] = stride_total
        self.num_features = in_channels
        self.num_classes = num_classes
        self.fc = nn.Linear(in_channels, num_classes) if num_classes > 0 else None
        self._init_weights(zero_init_last_bn)
        self.freeze(freeze_at)

    def _init_weights(self, zero_init_last_bn: bool) -> None:
        # He et al. 2015 ("MSRA") initialisation, which the paper uses.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last_bn:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)) and m.shortcut is not None:
                    norm = m.last_norm()
                    if hasattr(norm, "weight") and isinstance(norm.weight, nn.Parameter):
                        nn.init.zeros_(norm.weight)

    def freeze(self, freeze_at: int) -> None:
        """Freeze the first ``freeze_at`` stages (1: stem, 2: stem+res2, ...), Detectron2's convention."""
        if not 0 <= freeze_at <= len(self.stage_names):
            raise ValueError(f"freeze_at must be in [0, {len(self.stage_names)}], got {freeze_at}")
        for name in self.stage_names[:freeze_at]:
            stage = getattr(self, name)
            for p in stage.parameters():
                p.requires_grad_(False)
            convert_bn_to_frozen(stage)
        self.freeze_at = freeze_at

    def forward_features(self, x: torch.Tensor, out_stages: Sequence[str] = ("res5",)) -> dict[str, torch.Tensor]:
        """Run stages in order up to the last requested one; return the requested ones by name."""
        last = max(self.stage_names.index(s) for s in out_stages)
        outputs = {}
        for name in self.stage_names[: last + 1]:
            x = getattr(self, name)(x)
            if name in out_stages:
                outputs[name] = x
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x, (self.stage_names[-1],))[self.stage_names[-1]]
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x) if self.fc is not None else x


def convert_bn_to_frozen(module: nn.Module) -> nn.Module:
    """Replace BatchNorm layers in ``module`` (in place) by FrozenBatchNorm2d holding their statistics."""
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                frozen.weight.copy_(child.weight)
                frozen.bias.copy_(child.bias)
                frozen.running_mean.copy_(child.running_mean)
                frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            convert_bn_to_frozen(child)
    return module


class _FoldedAway(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d whose affine transform its convolution now applies (:func:`fold_frozen_bn`).
    It keeps its buffers and its place in the module tree, so state_dict keys and checkpoints are
    unchanged; its forward passes the input through."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FrozenBNConv2d(nn.Conv2d):
    """A convolution followed by a frozen batch norm, computed as one convolution.

    Frozen BN is ``y * s + t`` with fixed ``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``; so
    ``conv(x, W) * s + t = conv(x, W * s) + t``. Scaling the C_out filters costs a few thousand
    multiplies per step instead of two passes over the whole activation map (forward and backward),
    which is most of a frozen-BN network's elementwise work. The weights stay the trainable ones
    (gradients flow through the scaling); the BN's statistics are read at every call, so loading a
    checkpoint afterwards still takes effect."""

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The convolution's weight and bias with the batch norm applied."""
        bn = self._folded_bn
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        shift = bn.bias - bn.running_mean * scale
        weight = self.weight * scale.to(self.weight.dtype).view(-1, 1, 1, 1)
        if self.bias is not None:
            shift = shift + self.bias * scale
        return weight, shift.to(weight.dtype)

    def folded_once(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``folded()``, kept while its inputs are unchanged: the fold is half a dozen small kernels per
        convolution, which in inference (bound by kernel launches on a GPU) cost more than the
        convolution. Keyed by each input's storage and version, so loading weights or moving the module
        computes it anew."""
        bn = self._folded_bn
        inputs = (self.weight, self.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        key = tuple((t.data_ptr(), t._version) if t is not None else None for t in inputs)
        if getattr(self, "_fold_key", None) != key:
            with torch.no_grad():
                object.__setattr__(self, "_fold_cache", self.folded())
            object.__setattr__(self, "_fold_key", key)
        return self._fold_cache

    def bn_affine(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The frozen batch norm's ``s`` (shaped to scale the filters, and flat) and ``t``, kept while its
        buffers are unchanged (keyed as in :meth:`folded_once`): they are constants of training, so a training
        step pays the one multiply that scales the trainable filters, not the five small kernels that derive
        ``s`` and ``t`` (about 470 of a ResNet-101 C4 detector's 1,900 operators per training step, each a
        launch on a GPU)."""
        bn = self._folded_bn
        key = tuple((t.data_ptr(), t._version) for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))
        if getattr(self, "_affine_key", None) != key:
            with torch.no_grad():
                scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
                shift = bn.bias - bn.running_mean * scale
                object.__setattr__(self, "_affine", (scale.view(-1, 1, 1, 1), scale, shift))
            object.__setattr__(self, "_affine_key", key)
        return self._affine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced as plain tensor code, which the compiler fuses
            weight, bias = self.folded()
        elif self.weight.requires_grad and torch.is_grad_enabled():
            filter_scale, scale, shift = self.bn_affine()
            weight = self.weight * filter_scale.to(self.weight.dtype)  # gradients flow to the filters
            bias = (shift if self.bias is None else shift + self.bias * scale).to(weight.dtype)
        else:
            weight, bias = self.folded_once()
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def is_channels_last(module: nn.Module) -> bool:
    """Whether ``module``'s convolutions hold their weights channels-last (``module.to(memory_format=...)``).
    Read off the first convolution wider than 1x1: a 1x1 kernel's weight is contiguous in both layouts."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.weight.shape[-2:] != (1, 1):
            return m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
    return False


def fold_frozen_bn(module: nn.Module) -> int:
    """In ``module`` (in place), fold every FrozenBatchNorm2d that directly follows its convolution
    (``conv``/``bn``, ``conv1``/``bn1`` ... siblings, as in every block here) into that convolution
    (:class:`FrozenBNConv2d`). A trainable BatchNorm is left alone. Returns how many were folded."""
    folded = 0
    for parent in module.modules():
        for name, child in list(parent.named_children()):
            if type(child) is not FrozenBatchNorm2d or not name.startswith("bn"):
                continue
            conv = getattr(parent, "conv" + name[2:], None)
            if type(conv) is not nn.Conv2d or conv.out_channels != child.weight.numel():
                continue
            conv.__class__ = FrozenBNConv2d  # same parameters, same state_dict keys
            object.__setattr__(conv, "_folded_bn", child)  # a reference, not a second registration
            child.__class__ = _FoldedAway
            folded += 1
    return folded


# ---------------------------------------------------------------------------------------------
# Named constructors, mirroring torchvision.models so people and scripts find them.


def build_resnet(depth: int, *, plain: bool = False, cifar: bool = False, **kwargs) -> ResNet:
    """ResNet of a given depth. ImageNet: 18/34/50/101/152. CIFAR (6n+2): 20, 32, 44, 56, 110, 1202."""
    if plain:
        kwargs["shortcut"] = "none"
    if cifar:
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, 1202), got {depth}")
        n = (depth - 2) // 6
        kwargs.setdefault("shortcut", "A")
        kwargs.setdefault("base_width", 16)
        kwargs.setdefault("num_classes", 10)
        return ResNet("basic", (n, n, n), cifar=True, **kwargs)
    if depth not in IMAGENET_DEPTHS:
        raise ValueError(f"ImageNet ResNet depth must be one of {sorted(IMAGENET_DEPTHS)}, got {depth}")
    block, stages = IMAGENET_DEPTHS[depth]
    return ResNet(block, stages, **kwargs)


def resnet18(**kwargs) -> ResNet:
    return build_resnet(18, **kwargs)


def resnet34(**kwargs) -> ResNet:
    return build_resnet(34, **kwargs)


def resnet50(**kwargs) -> ResNet:
    return build_resnet(50, **kwargs)


def resnet101(**kwargs) -> ResNet:
    return build_resnet(101, **kwargs)


def resnet152(**kwargs) -> ResNet:
    return build_resnet(152, **kwargs)


def plain18(**kwargs) -> ResNet:
    return build_resnet(18, plain=True, **kwargs)


def plain34(**kwargs) -> ResNet:
    return build_resnet(34, plain=True, **kwargs)


def cifar_resnet(depth: int = 20, **kwargs) -> ResNet:
    return build_resnet(depth, cifar=True, **kwargs)


def cifar_plain(depth: int = 20, **kwargs) -> ResNet:
    return build_resnet(depth, cifar=True, plain=True, **kwargs)


def cifar_resnet20(**kwargs) -> ResNet:
    return cifar_resnet(20, **kwargs)


def cifar_resnet56(**kwargs) -> ResNet:
    return cifar_resnet(56, **kwargs)


def cifar_resnet110(**kwargs) -> ResNet:
    return cifar_resnet(110, **kwargs)
