"""RoI feature extraction: a fixed-size feature map per box, from one level or from an FPN pyramid.

Pooler types: ``ROIPool`` (max pooling over quantised bins, the paper's), ``ROIAlign`` (bilinear
sampling, Mask R-CNN, without the half-pixel shift) and ``ROIAlignV2`` (RoIAlign with
``aligned=True``: pixel centres at +0.5, what Detectron2 uses by default).

With several levels, a box of side ``s = sqrt(area)`` goes to level
``floor(canonical_level + log2(s / canonical_box_size))`` (FPN paper, eq. 1: a 224-pixel box to P4),
clamped to the available levels.

RoIAlign's kernel (``kernel``): ``auto`` takes, on the CPU and small maps, two matrix products
(:func:`roi_align_separable`) instead of torchvision's kernel, whose backward pass is a single-threaded
scatter loop: the same numbers, several times faster where it is chosen; elsewhere torchvision's op.
``triton`` (CUDA) reads channels-last bf16 features as they are and writes the pooled ones channels-last
(:mod:`.roi_align_triton`), where torchvision's op wants float32 NCHW copies both ways; not yet timed on a
GPU, so not yet what ``auto`` picks there. ``torchvision`` and ``separable`` force one. Compiled and
exported graphs always keep torchvision's op.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torchvision.ops import roi_align, roi_pool

from .box_ops import sizes_follow_data
from .config import PoolerType, RoIAlignKernel
from .roi_align_triton import roi_align_triton

POOLER_TYPES = tuple(t.value for t in PoolerType)
ROI_ALIGN_KERNELS = tuple(k.value for k in RoIAlignKernel)


def boxes_to_rois(boxes: Sequence[torch.Tensor]) -> torch.Tensor:
    """List of per-image (K_i, 4) boxes -> (sum K_i, 5) rows ``(image index, x1, y1, x2, y2)``."""
    rois = [torch.cat([torch.full_like(b[:, :1], i), b], dim=1) for i, b in enumerate(b.float() for b in boxes)]
    return torch.cat(rois, dim=0)


def assign_boxes_to_levels(boxes: torch.Tensor, min_level: int, max_level: int, canonical_box_size: float = 224,
                           canonical_level: int = 4) -> torch.Tensor:
    """Index (0 = ``min_level``) of the pyramid level each (K, 4) box is pooled from; a box of no or negative
    area: the finest level."""
    sizes = torch.sqrt(((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_box_size + 1e-8))
    return (levels.clamp(min=min_level, max=max_level) - min_level).to(torch.int64)


def _axis_weights(start: torch.Tensor, bin_size: torch.Tensor, grid: torch.Tensor, size: int, bins: int,
                  bin_step: int = 1) -> torch.Tensor:
    """(R, ceil(bins / bin_step), size): RoIAlign's bilinear weights along one axis, averaged over each bin's
    samples, for bins 0, bin_step, 2 * bin_step, ...

    Sample ``s`` of bin ``p`` sits at ``start + p * bin + (s + 0.5) * bin / grid``; outside ``[-1, size]``
    it counts zero, otherwise it is clamped to ``[0, size - 1]`` and spread over its two neighbours with
    the triangle ``max(0, 1 - |y - i|)``, which is torchvision's ``y_low``/``y_high`` interpolation."""
    most = max(int(grid.max()), 1) if grid.numel() else 1
    p = torch.arange(0, bins, bin_step, dtype=start.dtype, device=start.device).view(1, -1, 1)
    s = torch.arange(most, dtype=start.dtype, device=start.device).view(1, 1, -1)
    grid = grid.view(-1, 1, 1)
    step = bin_size.view(-1, 1, 1) / grid.clamp(min=1)  # no samples at all where grid <= 0 (empty boxes)
    y = start.view(-1, 1, 1) + p * bin_size.view(-1, 1, 1) + (s + 0.5) * step
    valid = (s < grid) & (y >= -1.0) & (y <= size)
    y = y.clamp(min=0, max=size - 1)
    cells = torch.arange(size, dtype=start.dtype, device=start.device)
    weights = (1 - (y.unsqueeze(-1) - cells).abs()).clamp(min=0) * valid.unsqueeze(-1)  # (R, bins, most, size)
    return weights.sum(2) / grid.clamp(min=1)


def _roi_grids(rois: torch.Tensor, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int,
               aligned: bool, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Per RoI, as torchvision's kernel computes them: the corner ``x1, y1`` on the map, the bin sizes
    and the number of samples per bin along x and y (``ceil(size / bins)`` when ``sampling_ratio <= 0``)."""
    boxes = rois[:, 1:].to(dtype) * spatial_scale - (0.5 if aligned else 0.0)
    x1, y1 = boxes[:, 0], boxes[:, 1]
    roi_w, roi_h = boxes[:, 2] - x1, boxes[:, 3] - y1
    if not aligned:  # the original RoIAlign forces boxes to at least one cell
        roi_w, roi_h = roi_w.clamp(min=1), roi_h.clamp(min=1)
    if sampling_ratio > 0:
        grid_w = grid_h = torch.full_like(roi_h, sampling_ratio)
    else:
        grid_w, grid_h = torch.ceil(roi_w / output_size[1]), torch.ceil(roi_h / output_size[0])
    return x1, y1, roi_w / output_size[1], roi_h / output_size[0], grid_w, grid_h


# Break-even of the cost model in :func:`separable_roi_align_is_cheaper`: multiply-adds of the matrix
# products per bilinear tap of torchvision's kernel, from ``bench/cpu_kernels.py`` on a 2-core AMD EPYC
# (fp32): 512 RoIs, 10x10 bins on a 16x16x64 map (the demo: 4 products per tap) take 12 ms with forward
# and backward against torchvision's 66, and 6 against 7 ms forward; on 50x76x1024 (COCO's res4: 35 per
# tap) 4.8 s against 3.9 s, and 2.4 against 0.7 s forward. The backward's gain is larger because
# torchvision's runs on one thread. On a 2-core Intel Xeon (AMX) the COCO case is 3.0 s against 6.0 s
# with the backward: there the constants pass up a gain (measured on two machines only).
SEPARABLE_MACS_PER_TAP = {"train": 16.0, "inference": 4.0}


def separable_roi_align_is_cheaper(features: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int],
                                   spatial_scale: float, sampling_ratio: int, aligned: bool, bin_step: int = 1
                                   ) -> bool:
    """Whether :func:`roi_align_separable` beats torchvision's kernel on these inputs (CPU): its products
    cost ``R * bins_y * W * C * (H + bins_x)`` multiply-adds wherever the boxes lie, the kernel 4 taps
    per sample, ``R * C * bins * samples per bin * 4``; it wins up to :data:`SEPARABLE_MACS_PER_TAP`.
    With ``bin_step`` the products shrink to the kept bins, the kernel's work does not (it pools them all)."""
    if rois.shape[0] == 0:
        return False
    _, channels, height, width = features.shape
    ph, pw = output_size
    kept_h, kept_w = kept_bins(output_size, bin_step)
    *_, grid_w, grid_h = _roi_grids(rois, output_size, spatial_scale, sampling_ratio, aligned, torch.float32)
    taps = 4 * channels * ph * pw * float((grid_w.clamp(min=0) * grid_h.clamp(min=0)).clamp(min=1).sum())
    macs = rois.shape[0] * kept_h * width * channels * (height + kept_w)
    mode = "train" if torch.is_grad_enabled() and features.requires_grad else "inference"
    return macs <= SEPARABLE_MACS_PER_TAP[mode] * taps


def roi_align_separable(features: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int],
                        spatial_scale: float, sampling_ratio: int, aligned: bool, bin_step: int = 1
                        ) -> torch.Tensor:
    """``torchvision.ops.roi_align`` (``rois`` as (R, 5) rows), computed as matrix products; with
    ``bin_step`` > 1 only every ``bin_step``-th bin along each axis (``roi_align(...)[:, :, ::s, ::s]``).

    RoIAlign's output is an average of bilinear samples on a grid in each bin, and bilinear sampling is
    a product of one weight along y and one along x, so for one RoI and channel ``out = A_y F A_x^T``
    with ``A_y`` (bins x H) and ``A_x`` (bins x W) holding the averaged weights (:func:`_axis_weights`).
    Per image: one product of all its RoIs' ``A_y`` with the feature map, then a batched product with
    their ``A_x``. Autograd differentiates the products with multithreaded BLAS, where torchvision's CPU
    backward scatters sample by sample on one thread. Equal to torchvision's kernel up to the order of
    float sums (float64: 1e-15), adaptive sampling (``sampling_ratio <= 0``) and boxes reaching outside
    the map or of no size included.

    The products span the whole map for every RoI, so they pay off on small maps only:
    :func:`separable_roi_align_is_cheaper` decides. Computed in float32 (float64 for float64 input),
    autocast off, returned in the input's dtype; channels-last features give a channels-last result."""
    n, channels, height, width = features.shape
    ph, pw = kept_bins(output_size, bin_step)
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    with torch.autocast(features.device.type, enabled=False):
        feats = features.to(dtype)
        x1, y1, bin_w, bin_h, grid_w, grid_h = _roi_grids(rois, output_size, spatial_scale, sampling_ratio,
                                                          aligned, dtype)
        weights_y = _axis_weights(y1, bin_h, grid_h, height, output_size[0], bin_step)  # (R, ph, H)
        weights_x = _axis_weights(x1, bin_w, grid_w, width, output_size[1], bin_step)  # (R, pw, W)
        image_index = rois[:, 0].long()
        order = None
        if image_index.numel() > 1 and bool((image_index[1:] < image_index[:-1]).any()):
            order = torch.argsort(image_index, stable=True)
            weights_y, weights_x, image_index = weights_y[order], weights_x[order], image_index[order]
        counts = torch.bincount(image_index, minlength=n).tolist()
        outs = []
        for i, (wy, wx) in enumerate(zip(weights_y.split(counts), weights_x.split(counts))):
            k = wy.shape[0]
            if k == 0:
                continue
            # contract y: (k*ph, H) @ (H, W*C) -> (k, ph, W, C)
            per_y = (wy.reshape(k * ph, height) @ feats[i].permute(1, 2, 0).reshape(height, width * channels))
            # contract x per RoI and y bin: (pw, W) @ (W, C) -> (k, ph, pw, C), channels-last memory
            outs.append(wx.unsqueeze(1) @ per_y.view(k, ph, width, channels))
        out = torch.cat(outs) if outs else feats.new_zeros((0, ph, pw, channels))
        if order is not None:
            out = out[torch.argsort(order)]
        out = out.permute(0, 3, 1, 2)
    if not (features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous()):
        out = out.contiguous()
    return out.to(features.dtype)


class ROIPooler(nn.Module):
    def __init__(self, output_size: int = 14, scales: Sequence[float] = (1.0 / 16,), sampling_ratio: int = 0,
                 pooler_type: str = "ROIAlignV2", canonical_box_size: float = 224, canonical_level: int = 4,
                 kernel: str = "auto"):
        super().__init__()
        if pooler_type not in POOLER_TYPES:
            raise ValueError(f"pooler_type must be one of {POOLER_TYPES}, got {pooler_type!r}")
        if kernel not in ROI_ALIGN_KERNELS:
            raise ValueError(f"RoIAlign kernel must be one of {ROI_ALIGN_KERNELS}, got {kernel!r}")
        self.kernel = kernel
        self.output_size = (int(output_size), int(output_size))
        self.scales = [float(s) for s in scales]
        self.sampling_ratio = int(sampling_ratio)
        self.pooler_type = pooler_type
        self.canonical_box_size = canonical_box_size
        self.canonical_level = canonical_level
        levels = [-math.log2(s) for s in self.scales]
        if any(abs(lv - round(lv)) > 1e-6 for lv in levels) or any(
                round(b) - round(a) != 1 for a, b in zip(levels[:-1], levels[1:])):
            raise ValueError(f"ROIPooler scales must be 1/2^k for consecutive k (finest first), got {list(scales)}")
        self.min_level, self.max_level = round(levels[0]), round(levels[-1])

    def pool(self, features: torch.Tensor, rois: torch.Tensor, scale: float, bin_step: int = 1) -> torch.Tensor:
        if self.pooler_type == "ROIPool":
            if features.dtype != rois.dtype:
                # bf16/fp16 features under autocast: torchvision's CPU kernel wants the rois in their dtype (it
                # has no autocast rule there), and bf16 would move box corners by pixels at COCO's sizes. A max
                # is exact in any precision, so pooling in float32 and casting back gives the same values.
                out = roi_pool(features.float(), rois.float(), self.output_size, scale).to(features.dtype)
            else:
                out = roi_pool(features, rois, self.output_size, scale)
            return keep_every(out, bin_step)
        aligned = self.pooler_type == "ROIAlignV2"
        args = (features, rois, self.output_size, scale, self.sampling_ratio, aligned, bin_step)
        kernel = self.kernel
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            kernel = "torchvision"  # a graph keeps the op it knows (the products' sizes depend on the boxes)
        elif kernel == "auto":
            kernel = ("separable" if features.device.type == "cpu" and separable_roi_align_is_cheaper(*args)
                      else "torchvision")
        if kernel == "separable":
            return roi_align_separable(*args)
        if kernel == "triton":
            return roi_align_triton(*args)
        return keep_every(roi_align(*args[:5], aligned=aligned), bin_step)

    def forward(self, features: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor], bin_step: int = 1
                ) -> torch.Tensor:
        """``features``: one (N, C, H, W) map per level (finest first); ``boxes``: per image (K_i, 4)
        in input pixels. Returns (sum K_i, C, S, S), rows in the order of the concatenated boxes; with
        ``bin_step`` only every ``bin_step``-th bin along each axis, (sum K_i, C, ceil(S / step), ...)."""
        if len(features) != len(self.scales):
            raise ValueError(f"ROIPooler: {len(features)} feature maps for {len(self.scales)} scales")
        # float32 boxes; float64 for a float64 model (gradient checks): torchvision's op wants one dtype
        rois = boxes_to_rois(boxes).to(features[0].device,
                                       torch.float64 if features[0].dtype == torch.float64 else torch.float32)
        if len(features) == 1:
            return self.pool(features[0], rois, self.scales[0], bin_step)
        levels = assign_boxes_to_levels(rois[:, 1:], self.min_level, self.max_level, self.canonical_box_size,
                                        self.canonical_level)
        if sizes_follow_data(rois.device):  # each level's RoIs only
            channels = features[0].shape[1]
            out = features[0].new_zeros((rois.shape[0], channels) + kept_bins(self.output_size, bin_step))
            for level, (fmap, scale) in enumerate(zip(features, self.scales)):
                idx = torch.nonzero(levels == level, as_tuple=True)[0]
                out[idx] = self.pool(fmap, rois[idx], scale, bin_step).to(out.dtype)
            return out
        # Without a host synchronisation (a GPU): a level's RoIs are known on the device only, so every level
        # pools every RoI, the other levels' shrunk to a point at their top-left corner, and each row is taken
        # from its own level. A point has no samples with adaptive sampling (``sampling_ratio`` 0, aligned),
        # so those rows cost a write of zeros, not the bilinear taps; each row's own level computes it as
        # above, to the bit. The extra rows' gradients are zeros, which add nothing. Each level's rows go into
        # the first level's output in place (the others' zeroed, then added), so at most two outputs are alive
        # (bench/pooler_memory.py, 2048 RoIs: forward 196 MiB; pooling each level's RoIs, 139; a torch.where per
        # level, 294). ROIPool keeps each level's argmax, every RoI's, for its backward: 2.6 times the grouped
        # path's forward memory.
        points = torch.cat([rois[:, :3], rois[:, 1:3]], dim=1)
        out = None
        for level, (fmap, scale) in enumerate(zip(features, self.scales)):
            member = (levels == level)[:, None]
            pooled = self.pool(fmap, torch.where(member, rois, points), scale, bin_step).to(features[0].dtype)
            pooled.masked_fill_(~member[..., None, None], 0)  # ROIPool's and ROIAlign's points are not 0
            out = pooled if out is None else out.add_(pooled)
            del pooled  # before the next level's output is made
        return out


def kept_bins(output_size: tuple[int, int], step: int) -> tuple[int, int]:
    """The pooled grid's size when only every ``step``-th bin along each axis is kept (bins 0, step, ...)."""
    return tuple(-(-size // step) for size in output_size)


def keep_every(pooled: torch.Tensor, step: int) -> torch.Tensor:
    """Every ``step``-th bin of (R, C, S, S) pooled features, copied in their memory format so that the whole
    grid's memory is freed (a view would keep it, for instance saved by the next convolution for backward)."""
    return pooled[:, :, ::step, ::step].clone(memory_format=torch.preserve_format) if step > 1 else pooled
