"""RoIAlign as Triton kernels that read and write channels-last features in their own dtype (CUDA).

torchvision's CUDA RoIAlign takes contiguous NCHW float32 (its autocast rule casts bf16 to float32), so a
bf16 channels-last trunk pays a layout and type copy of the features on the way in, and of the pooled RoI
features (the C4 head's largest tensor: R x 1024 x 14 x 14) on the way out and again in the backward pass;
on an H100 those copies and the kernels took about a third of the R101-C4 step's GPU time
(``bench/results/h100_profile_r101c4_r50fpn.txt``). These kernels gather each bin's channels as one
contiguous vector from NHWC memory, accumulate in float32 and store the pooled features channels-last in the
input's dtype, the layout res5 consumes; the backward pass adds each sample's share into a float32 NHWC
gradient with atomics, as torchvision's does in NCHW. ``bin_step`` pools every ``bin_step``-th bin only (the
C4 head in the paper's layout).

Sampling is torchvision's to the operation: sample ``(iy, ix)`` of bin ``(ph, pw)`` at
``start + p * bin + (i + 0.5) * bin / grid``, zero outside ``[-1, size]``, clamped to the map, bilinear
between its four neighbours, averaged over ``max(grid_h * grid_w, 1)``. Tested against ``torchvision.ops.
roi_align`` (values and gradients) in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``); how fast it
is on a GPU is for ``bench/det_speed.py --variants triton`` to say.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # torch wheels without Triton (CPU-only builds, some platforms)
    triton = None


# TRITON_INTERPRET=1 when this module is imported: the kernels run on the CPU, in Triton's interpreter (tests)
INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)

if triton is not None:
    @triton.jit
    def _sample_corners(y, x, height, width):
        """Bilinear neighbours and weights of the point (y, x), torchvision's rules; weights are zero for a
        point outside [-1, size]."""
        valid = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)  # false for NaN
        y = tl.where(valid, tl.maximum(y, 0.0), 0.0)  # in [0, size] before the cast: no index leaves the map
        x = tl.where(valid, tl.maximum(x, 0.0), 0.0)
        y_low = tl.minimum(y.to(tl.int32), height - 1)  # y >= 0: truncation is the floor
        x_low = tl.minimum(x.to(tl.int32), width - 1)
        y = tl.where(y_low >= height - 1, y_low.to(y.dtype), y)  # at the last row all weight goes to it
        x = tl.where(x_low >= width - 1, x_low.to(x.dtype), x)
        y_high = tl.minimum(y_low + 1, height - 1)
        x_high = tl.minimum(x_low + 1, width - 1)
        ly = y - y_low
        lx = x - x_low
        hy = 1.0 - ly
        hx = 1.0 - lx
        return (y_low, y_high, x_low, x_high, tl.where(valid, hy * hx, 0.0), tl.where(valid, hy * lx, 0.0),
                tl.where(valid, ly * hx, 0.0), tl.where(valid, ly * lx, 0.0), valid)

    @triton.jit
    def _program_bin(rois, channels, spatial_scale, sampling_ratio, PH: tl.constexpr, PW: tl.constexpr,
                     KEPT_H: tl.constexpr, KEPT_W: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's RoI ``r``, kept bin ``(i, j)`` and channels, and the RoI's sampling grid."""
        pid = tl.program_id(0)
        r = pid // (KEPT_H * KEPT_W)
        i = (pid // KEPT_W) % KEPT_H
        j = pid % KEPT_W
        cs = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        roi = rois + r * 5
        image = tl.load(roi).to(tl.int32)
        offset = 0.5 if ALIGNED else 0.0
        start_w = tl.load(roi + 1) * spatial_scale - offset
        start_h = tl.load(roi + 2) * spatial_scale - offset
        roi_w = tl.load(roi + 3) * spatial_scale - offset - start_w
        roi_h = tl.load(roi + 4) * spatial_scale - offset - start_h
        if not ALIGNED:  # the original RoIAlign forces boxes to at least one cell
            roi_w = tl.maximum(roi_w, 1.0)
            roi_h = tl.maximum(roi_h, 1.0)
        bin_w = roi_w / PW
        bin_h = roi_h / PH
        grid_h = tl.where(sampling_ratio > 0, sampling_ratio, tl.ceil(roi_h / PH).to(tl.int32))
        grid_w = tl.where(sampling_ratio > 0, sampling_ratio, tl.ceil(roi_w / PW).to(tl.int32))
        count = tl.maximum(grid_h * grid_w, 1).to(start_w.dtype)
        return r, i, j, cs, cs < channels, image, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count

    @triton.jit
    def _roi_align_forward(features, rois, out, channels, height, width, f_n, f_c, f_h, f_w, o_r, o_c, o_h, o_w,
                           spatial_scale, sampling_ratio, PH: tl.constexpr, PW: tl.constexpr,
                           KEPT_H: tl.constexpr, KEPT_W: tl.constexpr, STEP: tl.constexpr,
                           ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr):
        """One program: one RoI, one kept bin, BLOCK_C channels."""
        r, i, j, cs, cmask, image, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = _program_bin(
            rois, channels, spatial_scale, sampling_ratio, PH, PW, KEPT_H, KEPT_W, ALIGNED, BLOCK_C)
        base = features + image.to(tl.int64) * f_n + cs * f_c
        acc = tl.zeros((BLOCK_C,), dtype=start_w.dtype)
        for iy in range(0, grid_h):
            y = start_h + (i * STEP) * bin_h + (iy + 0.5) * bin_h / grid_h
            for ix in range(0, grid_w):
                x = start_w + (j * STEP) * bin_w + (ix + 0.5) * bin_w / grid_w
                y_low, y_high, x_low, x_high, w1, w2, w3, w4, valid = _sample_corners(y, x, height, width)
                v1 = tl.load(base + y_low * f_h + x_low * f_w, mask=cmask, other=0.0).to(acc.dtype)
                v2 = tl.load(base + y_low * f_h + x_high * f_w, mask=cmask, other=0.0).to(acc.dtype)
                v3 = tl.load(base + y_high * f_h + x_low * f_w, mask=cmask, other=0.0).to(acc.dtype)
                v4 = tl.load(base + y_high * f_h + x_high * f_w, mask=cmask, other=0.0).to(acc.dtype)
                acc += w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4
        result = acc / count
        target = out + r.to(tl.int64) * o_r + cs * o_c + i * o_h + j * o_w
        tl.store(target, result.to(out.dtype.element_ty), mask=cmask)

    @triton.jit
    def _roi_align_backward(grad_in, rois, grad_out, channels, height, width, g_n, g_c, g_h, g_w,
                            o_r, o_c, o_h, o_w, spatial_scale, sampling_ratio, PH: tl.constexpr, PW: tl.constexpr,
                            KEPT_H: tl.constexpr, KEPT_W: tl.constexpr, STEP: tl.constexpr,
                            ALIGNED: tl.constexpr, BLOCK_C: tl.constexpr):
        """The forward's sampling, each sample's share of the bin's gradient added to its four neighbours.
        The adds are relaxed: nothing reads the gradient before the kernel ends, and Triton's default
        (acquire-release) puts a GPU-wide memory barrier and an L1 invalidation around every one (sm_90 SASS)."""
        r, i, j, cs, cmask, image, start_h, start_w, bin_h, bin_w, grid_h, grid_w, count = _program_bin(
            rois, channels, spatial_scale, sampling_ratio, PH, PW, KEPT_H, KEPT_W, ALIGNED, BLOCK_C)
        source = grad_out + r.to(tl.int64) * o_r + cs * o_c + i * o_h + j * o_w
        grad = tl.load(source, mask=cmask, other=0.0).to(grad_in.dtype.element_ty) / count
        base = grad_in + image.to(tl.int64) * g_n + cs * g_c
        for iy in range(0, grid_h):
            y = start_h + (i * STEP) * bin_h + (iy + 0.5) * bin_h / grid_h
            for ix in range(0, grid_w):
                x = start_w + (j * STEP) * bin_w + (ix + 0.5) * bin_w / grid_w
                y_low, y_high, x_low, x_high, w1, w2, w3, w4, valid = _sample_corners(y, x, height, width)
                mask = tl.where(valid, cmask, False)  # (cmask & valid: the interpreter cannot broadcast it)
                tl.atomic_add(base + y_low * g_h + x_low * g_w, grad * w1, mask=mask, sem="relaxed")
                tl.atomic_add(base + y_low * g_h + x_high * g_w, grad * w2, mask=mask, sem="relaxed")
                tl.atomic_add(base + y_high * g_h + x_low * g_w, grad * w3, mask=mask, sem="relaxed")
                tl.atomic_add(base + y_high * g_h + x_high * g_w, grad * w4, mask=mask, sem="relaxed")


def launch_config(channels: int, element_size: int) -> tuple[int, int]:
    """``(BLOCK_C, num_warps)``: a program's channels and warps, for a feature-shaped tensor (the taps' features
    forward, the float32 gradient backward) of ``element_size`` bytes. Each thread holds 16 bytes of consecutive
    channels of it (8 in bf16, 4 in float32), so each tap is one 16-byte access per thread, the widest there is;
    up to 4 warps a program (C4's 1024 res4 channels: one program a bin in bf16, two in float32), fewer for
    fewer channels (FPN's 256: one warp in bf16). Sized by the feature-shaped tensor, not the pooled one: in the
    backward pass bf16's 8 channels a thread would be regrouped by 4 through shared memory for every float32
    reduction."""
    per_warp = 16 * 32 // element_size
    block_c = min(4 * per_warp, triton.next_power_of_2(channels))
    return block_c, max(1, block_c // per_warp)


def _launch(kernel, mapped: torch.Tensor, rois: torch.Tensor, pooled: torch.Tensor, output_size, spatial_scale,
            sampling_ratio, aligned, bin_step):
    """Run ``kernel`` over every (RoI, kept bin, channel block); ``mapped`` is the feature-shaped tensor
    (features or their gradient), ``pooled`` the RoI-shaped one (output or its gradient)."""
    rois_count, channels, kept_h, kept_w = pooled.shape
    if rois_count == 0:
        return
    block_c, num_warps = launch_config(channels, mapped.element_size())
    grid = (rois_count * kept_h * kept_w, triton.cdiv(channels, block_c))
    _, _, height, width = mapped.shape
    m_n, m_c, m_h, m_w = mapped.stride()
    o_r, o_c, o_h, o_w = pooled.stride()
    kernel[grid](mapped, rois, pooled, channels, height, width, m_n, m_c, m_h, m_w, o_r, o_c, o_h, o_w,
                 float(spatial_scale), int(sampling_ratio), PH=output_size[0], PW=output_size[1], KEPT_H=kept_h,
                 KEPT_W=kept_w, STEP=bin_step, ALIGNED=bool(aligned), BLOCK_C=block_c, num_warps=num_warps)


class _RoIAlign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, rois, output_size, spatial_scale, sampling_ratio, aligned, bin_step):
        kept = (-(-output_size[0] // bin_step), -(-output_size[1] // bin_step))
        rois = rois.to(torch.float64 if features.dtype == torch.float64 else torch.float32).contiguous()
        out = torch.empty((rois.shape[0], features.shape[1]) + kept, dtype=features.dtype, device=features.device,
                          memory_format=torch.channels_last)
        _launch(_roi_align_forward, features, rois, out, output_size, spatial_scale, sampling_ratio, aligned,
                bin_step)
        ctx.save_for_backward(rois)
        ctx.args = (features.shape, features.dtype, output_size, spatial_scale, sampling_ratio, aligned, bin_step)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (rois,) = ctx.saved_tensors
        shape, dtype, output_size, spatial_scale, sampling_ratio, aligned, bin_step = ctx.args
        accumulate = torch.float64 if dtype == torch.float64 else torch.float32
        grad_in = torch.empty(shape, dtype=accumulate, device=grad_out.device, memory_format=torch.channels_last)
        grad_in.zero_()
        _launch(_roi_align_backward, grad_in, rois, grad_out, output_size, spatial_scale, sampling_ratio, aligned,
                bin_step)
        return grad_in.to(dtype), None, None, None, None, None, None


def check_triton_runs(device: torch.device, key: str) -> None:
    """A clear error, naming the config ``key`` that asked for Triton, where its kernels cannot run: off CUDA
    (unless interpreted) or without Triton."""
    if triton is None or (device.type != "cuda" and not INTERPRETED):
        raise RuntimeError(f"{key}=triton runs on CUDA with Triton installed (here: {device.type}, Triton "
                           f"{'present' if triton else 'missing'}); fix: {key}=auto")


def roi_align_triton(features: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int],
                     spatial_scale: float, sampling_ratio: int, aligned: bool, bin_step: int = 1) -> torch.Tensor:
    """``torchvision.ops.roi_align(features, rois, ...)[:, :, ::bin_step, ::bin_step]`` (``rois`` as (R, 5)
    rows), computed in the features' dtype with float32 sums, returned channels-last in that dtype; any
    input layout is read through its strides, channels-last (NHWC) reads one contiguous vector per tap."""
    check_triton_runs(features.device, "model.roi_heads.pooler_kernel")
    return _RoIAlign.apply(features, rois, tuple(output_size), spatial_scale, sampling_ratio, aligned, bin_step)
