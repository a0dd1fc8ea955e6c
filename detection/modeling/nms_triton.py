"""Non-maximum suppression for a batch of images as two Triton kernels whose output size does not depend on the
data (CUDA): the host never waits for the GPU.

torchvision's NMS returns the kept indices, a tensor whose length only the GPU knows: the host reads it, and so
waits until every kernel queued before has run; then the GPU idles while the host launches what follows (issue
9's profile: the RPN's NMS, one per image, is what is left of the training step's host synchronisations). Here
the result is each box's rank among the kept boxes of its image (``len`` for the others), a fixed-size tensor,
which ``rpn.select_proposals`` turns into proposals with a top-k.

The algorithm is torchvision's CUDA one, per image and all images in one launch:

1. ``_suppression_bits``: for the boxes sorted by decreasing score, bit ``j`` of row ``i`` is set when box
   ``j`` comes after box ``i``, belongs to the same group (FPN level) and overlaps it by IoU > threshold, in
   torchvision's arithmetic (``inter / (area_i + area_j - inter)`` in float32), one 32-bit word per 32
   columns;
2. ``_greedy_ranks``: one program per image walks the boxes in score order, keeping a box unless a kept box
   before it has set its bit, and ORs each kept box's row into the removed set; it stops keeping once
   ``max_keep`` are kept (``box_ops.batched_nms_first``'s count).

Tested against ``torchvision.ops.nms`` per image and group in Triton's interpreter on the CPU
(``TRITON_INTERPRET=1``), and compiled for an H100's machine code without one; how fast it is on a GPU is for
``bench/det_speed.py --variants triton`` to say.
"""
from __future__ import annotations

import torch

from .config import NMSKernel
from .roi_align_triton import check_triton_runs, triton

NMS_KERNELS = tuple(k.value for k in NMSKernel)


def takes_triton_nms(nms_kernel: str) -> bool:
    """Whether NMS runs as these kernels: asked for, and not inside a compiled or exported graph (which keeps
    torchvision's op, which it knows)."""
    return nms_kernel == "triton" and not (torch.compiler.is_compiling() or torch.jit.is_tracing())


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _suppression_bits(boxes, groups, bits, count, words, iou_threshold, BLOCK_I: tl.constexpr,
                          BLOCK_W: tl.constexpr):
        """Program (image, block of BLOCK_I rows, block of BLOCK_W words): the rows' suppression bits over
        BLOCK_W * 32 columns. ``boxes`` (B, N, 4) and ``groups`` (B, N) sorted by decreasing score."""
        image = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
        cols = tl.program_id(2) * (BLOCK_W * 32) + tl.arange(0, BLOCK_W * 32)
        row_in, col_in = rows < count, cols < count
        base = boxes + image * count * 4
        rx1 = tl.load(base + rows * 4, mask=row_in, other=0.0)
        ry1 = tl.load(base + rows * 4 + 1, mask=row_in, other=0.0)
        rx2 = tl.load(base + rows * 4 + 2, mask=row_in, other=0.0)
        ry2 = tl.load(base + rows * 4 + 3, mask=row_in, other=0.0)
        cx1 = tl.load(base + cols * 4, mask=col_in, other=0.0)
        cy1 = tl.load(base + cols * 4 + 1, mask=col_in, other=0.0)
        cx2 = tl.load(base + cols * 4 + 2, mask=col_in, other=0.0)
        cy2 = tl.load(base + cols * 4 + 3, mask=col_in, other=0.0)
        width = tl.maximum(tl.minimum(rx2[:, None], cx2[None, :]) - tl.maximum(rx1[:, None], cx1[None, :]), 0.0)
        height = tl.maximum(tl.minimum(ry2[:, None], cy2[None, :]) - tl.maximum(ry1[:, None], cy1[None, :]), 0.0)
        inter = width * height
        row_area = (rx2 - rx1) * (ry2 - ry1)
        col_area = (cx2 - cx1) * (cy2 - cy1)
        iou = inter / (row_area[:, None] + col_area[None, :] - inter)
        row_group = tl.load(groups + image * count + rows, mask=row_in, other=-1)
        col_group = tl.load(groups + image * count + cols, mask=col_in, other=-2)
        suppress = ((iou > iou_threshold) & (cols[None, :] > rows[:, None]) & col_in[None, :]
                    & (row_group[:, None] == col_group[None, :]))
        one = tl.full((BLOCK_I, BLOCK_W * 32), 1, tl.int32)
        bit = tl.where(suppress, one << (cols[None, :] % 32), 0)
        # distinct bits: their sum is their OR (bit 31 is negative in int32, and the sum stays in range)
        packed = tl.sum(tl.reshape(bit, (BLOCK_I, BLOCK_W, 32)), axis=2)
        word = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
        target = bits + (image * count + rows[:, None]) * words + word[None, :]
        tl.store(target, packed, mask=row_in[:, None] & (word[None, :] < words))

    @triton.jit
    def _greedy_ranks(bits, ranks, count, words, max_keep, WORDS: tl.constexpr):
        """Program (image): the greedy pass over its boxes in score order; ``ranks[i]`` is box ``i``'s place
        among the kept boxes, left as it is (``count``) for the others."""
        image = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, WORDS)
        removed = tl.zeros((WORDS,), dtype=tl.int32)
        kept = tl.zeros((), dtype=tl.int32)
        rows = bits + image * count * words
        for t in range(0, words):
            word = tl.sum(tl.where(offsets == t, removed, 0))  # word t of the removed set
            for b in range(0, 32):
                i = t * 32 + b
                if (((word >> b) & 1) == 0) & (i < count) & (kept < max_keep):
                    row = rows + i * words
                    # words after t into the set; word t into ``word``, which is read again here
                    removed |= tl.load(row + offsets, mask=(offsets > t) & (offsets < words), other=0)
                    word |= tl.load(row + t)
                    tl.store(ranks + image * count + i, kept.to(tl.int64))
                    kept += 1


def nms_ranks_triton(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_threshold: float,
                     max_keep: int) -> torch.Tensor:
    """Per image, NMS over ``boxes`` (B, N, 4) with ``scores`` (B, N), boxes of different ``groups`` ((N,) or
    (B, N)) never suppressing each other, stopped once ``max_keep`` boxes are kept. Returns (B, N) int64: each
    box's place among its image's kept boxes in decreasing score (``batched_nms_first``'s order), ``N`` where
    it is not kept. Equal scores keep their input order (a stable sort; torchvision leaves that order open)."""
    check_triton_runs(boxes.device, "model.nms_kernel")
    num_images, count = scores.shape
    if count == 0 or num_images == 0 or max_keep <= 0:
        return torch.full((num_images, count), count, dtype=torch.int64, device=scores.device)
    order = scores.argsort(dim=1, descending=True, stable=True)
    sorted_boxes = boxes.float().gather(1, order[..., None].expand(-1, -1, 4)).contiguous()
    sorted_groups = groups.expand(num_images, count).gather(1, order).to(torch.int32).contiguous()
    words = triton.cdiv(count, 32)
    bits = torch.empty((num_images, count, words), dtype=torch.int32, device=scores.device)
    block_i, block_w = 32, 4
    _suppression_bits[(num_images, triton.cdiv(count, block_i), triton.cdiv(words, block_w))](
        sorted_boxes, sorted_groups, bits, count, words, float(iou_threshold), BLOCK_I=block_i, BLOCK_W=block_w)
    sorted_ranks = torch.full((num_images, count), count, dtype=torch.int64, device=scores.device)
    _greedy_ranks[(num_images,)](bits, sorted_ranks, count, words, int(max_keep),
                                 WORDS=triton.next_power_of_2(words))
    return torch.empty_like(sorted_ranks).scatter_(1, order, sorted_ranks)  # order is a permutation: all written
