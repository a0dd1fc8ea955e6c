"""Small box utilities the heads share (xyxy boxes in pixels); IoU itself is torchvision.ops.box_iou, and
``box_iou_batched`` the same arithmetic with batch dimensions."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import torch
import torchvision


# each image's unpadded (height, width): numbers (or an exported graph's symbols), or a (B, 2) integer tensor on
# the device, which a CUDA graph reads as an input (GeneralizedRCNN.padded_detections)
ImageSizes = Sequence[tuple[int, int]] | torch.Tensor


def sizes_follow_data(device: torch.device) -> bool:
    """Whether the heads' fixed sizes give way to the data's own on this device. Reading a data-dependent
    size (a count, a ``nonzero``) makes the host wait for the device, so a GPU keeps fixed sizes; on the CPU
    the read costs nothing and the fixed sizes would carry work for nothing:

    * inference hands the RoI heads each image's valid proposals only, and training its valid RoI samples
      only (on COCO-sized images a GPU has next to no padding there: NMS leaves more than ``post_nms_topk``
      candidates, and more than ``batch_size_per_image`` can be sampled; on small images or with an
      untrained RPN most rows can be padding, which res5 or the box head would carry: R50-FPN inference at
      96x128, 1000 rows, a few hundred of them proposals);
    * the FPN pooler pools each level's RoIs only, where a GPU pools every RoI on every level with the
      other levels' RoIs shrunk to a point (``poolers.ROIPooler``).

    The random draws are the same either way, and so are the losses and detections up to float rounding.
    Not in an exported graph, whose sizes may not depend on the data."""
    return device.type == "cpu" and not (torch.compiler.is_exporting() or torch.jit.is_tracing())


def _groups_apart(boxes: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Boxes shifted by their group's index times the extent of all boxes, so that boxes of different
    groups never overlap; in float64 (float32 under ``torch.export``, see :func:`batched_nms`)."""
    dtype = boxes.dtype if torch.compiler.is_exporting() else torch.float64
    boxes = boxes.to(dtype)
    extent = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).abs().max() + 1
    return boxes + (groups.to(dtype) * extent)[:, None]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_thresh: float) -> torch.Tensor:
    """NMS within each group (level, class, image x level, image x class): one ``torchvision.ops.nms`` over
    boxes shifted apart per group, indices sorted by decreasing score.

    Departs from ``torchvision.ops.batched_nms``, which above 4000 (CPU) or 20000 (CUDA) box coordinates
    runs one NMS per group, each after a ``unique`` and a ``where`` the host waits for. The shift is the
    same coordinate trick, but in float64, so that the shifted coordinates of float32 boxes stay exact even
    with thousands of groups (float32 would round them by up to 1/8 pixel at 1280 groups of 1333 pixels):
    the IoUs are those of the boxes themselves, computed in higher precision (a decision can differ only
    for an IoU within about 1e-7 of the threshold). Under ``torch.export`` the shift stays float32, the
    type an exported NMS (ONNX) takes. The shift is also defined for no boxes at all. One NMS for a whole
    batch costs the square of its size in IoUs: (N x boxes)^2 where per image it was N x boxes^2."""
    shifted = _groups_apart(boxes, groups)
    return torchvision.ops.nms(shifted, scores.to(shifted.dtype), iou_thresh)


def batched_nms_first(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor, iou_thresh: float,
                      count: int) -> torch.Tensor:
    """The first ``count`` indices :func:`batched_nms` returns (all, if it keeps fewer), the same ones.

    Greedy NMS keeps a box when no kept box of a higher score overlaps it, so it can stop once ``count``
    are kept, where torchvision's kernel goes on over every box: the RPN keeps 300 of 1000 candidates
    per image in the demo, and its 300th kept box ranks 380-460 early in training and 480-640 late. On
    the CPU the boxes go in chunks in decreasing score (stable, as the kernel sorts): each chunk goes
    through ``torchvision.ops.nms`` behind the boxes kept so far, with the negated rank as score, so
    that the kept ones come first, never suppress each other, and suppress the chunk's boxes just as in
    one call over all (same shifted float64 coordinates, same kernel). The first chunk holds ``count``
    boxes, each next one as many as the last chunk's rate kept says the rest needs, and half again.
    Where NMS keeps fewer than ``count`` in all, every chunk runs and costs a little more than one call
    (``bench/cpu_kernels.py``). On a GPU each chunk's count would wait for the device, so there the
    whole set goes through at once."""
    if (boxes.device.type != "cpu" or torch.compiler.is_compiling() or count <= 0
            or scores.shape[0] <= 2 * count):
        return batched_nms(boxes, scores, groups, iou_thresh)[:count]
    shifted = _groups_apart(boxes, groups)
    order = torch.sort(scores.to(shifted.dtype), descending=True, stable=True).indices
    kept_ranks, start, size = order.new_zeros(0), 0, count
    while start < order.shape[0]:
        ranks = torch.cat([kept_ranks, torch.arange(start, min(start + size, order.shape[0]))])
        found = kept_ranks.shape[0]
        kept_ranks = ranks[torchvision.ops.nms(shifted[order[ranks]], -ranks.to(shifted.dtype), iou_thresh)]
        start += size
        if kept_ranks.shape[0] >= count:
            break
        # the rate kept falls with rank (more kept boxes to overlap): extrapolate the last chunk's rate,
        # with half again as many, and leave no tail shorter than half a chunk
        rate = max(kept_ranks.shape[0] - found, 1) / size
        size = max(count // 2, math.ceil(1.5 * (count - kept_ranks.shape[0]) / rate))
        if start + 1.5 * size >= order.shape[0]:
            size = order.shape[0] - start
    return order[kept_ranks[:count]]


_STREAMS: dict[tuple[torch.device, int], torch.cuda.Stream] = {}
_THREADS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="nms")


def batched_nms_per_image(boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                          iou_thresh: float, count: int) -> list[torch.Tensor]:
    """``batched_nms_first(..., count)`` of each image's boxes ``(N, C, 4)``, scores ``(N, C)`` and groups
    ``(C,)``: N index tensors.

    On a GPU the images' NMS run at the same time, each on its own CUDA stream from its own host thread.
    torchvision's NMS ends in a greedy pass that one thread block makes over the boxes (about 4.5 ms for
    12000 boxes on an H100) and in a read of the count by the host, so one image after another left the
    GPU nearly idle for N of those passes: 8 images were a sixth of an R101-C4 training step. The threads
    wait for the GPU without the interpreter lock, so the passes overlap."""
    if boxes.device.type != "cuda" or len(boxes) < 2 or torch.compiler.is_compiling():
        return [batched_nms_first(b, s, groups, iou_thresh, count) for b, s in zip(boxes, scores)]
    main = torch.cuda.current_stream(boxes.device)
    streams = [_STREAMS.setdefault((boxes.device, i), torch.cuda.Stream(boxes.device)) for i in range(len(boxes))]

    def one(i: int) -> torch.Tensor:
        with torch.cuda.stream(streams[i]):
            return batched_nms_first(boxes[i], scores[i], groups, iou_thresh, count)

    for stream in streams:
        stream.wait_stream(main)  # the boxes and scores are written on the main stream
    keeps = list(_THREADS.map(one, range(len(boxes))))
    for stream, keep in zip(streams, keeps):
        main.wait_stream(stream)
        keep.record_stream(main)  # made on a side stream, used on the main one: not to be reused before
    return keeps


def clip_boxes(boxes: torch.Tensor, image_size: tuple[int, int] | torch.Tensor) -> torch.Tensor:
    """Clip ``(..., 4)`` boxes to an ``(height, width)`` image: two numbers, or a tensor ``(..., 2)`` of sizes
    whose leading dimensions broadcast against the boxes' (sizes held on the device, where a CUDA graph reads
    them as an input instead of recording them as constants: :meth:`GeneralizedRCNN.padded_detections`)."""
    if isinstance(image_size, torch.Tensor):
        limits = image_size.flip(-1).to(boxes.dtype)  # (w, h)
        return boxes.clamp(min=0).minimum(torch.cat([limits, limits], dim=-1))
    h, w = image_size
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def nonempty(boxes: torch.Tensor, min_size: float = 0.0) -> torch.Tensor:
    """Mask ``(...)`` of ``(..., 4)`` boxes whose sides are both longer than ``min_size`` pixels."""
    return ((boxes[..., 2] - boxes[..., 0]) > min_size) & ((boxes[..., 3] - boxes[..., 1]) > min_size)


def pad_stack(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, N, ...)`` from B tensors ``(N_i, ...)`` on one device, zero-padded to the longest, and the mask
    ``(B, N)`` of the rows that are real: per-image sets (ground truth, crowd regions) as one tensor, so that
    what is done to them is a few operators for the whole batch, not a few per image (each a launch on a
    GPU). Filled by one copy from their concatenation, to rows the host computes from the lengths alone."""
    first, lengths = tensors[0], [len(t) for t in tensors]
    longest, shape = max(lengths), tuple(first.shape[1:])
    if min(lengths) == longest:
        return torch.stack(list(tensors)), torch.ones(len(tensors), longest, dtype=torch.bool, device=first.device)
    rows = [i * longest + j for i, n in enumerate(lengths) for j in range(n)]
    valid = torch.tensor([[j < n for j in range(longest)] for n in lengths], dtype=torch.bool)
    out = first.new_zeros((len(tensors) * longest,) + shape)
    out.index_copy_(0, torch.tensor(rows).to(first.device, non_blocking=True), torch.cat(list(tensors)))
    return out.view((len(tensors), longest) + shape), valid.to(first.device, non_blocking=True)


def pairwise_intersection(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """``(..., N, M)`` intersection areas of ``(..., N, 4)`` and ``(..., M, 4)`` boxes (torchvision's
    ``box_iou`` arithmetic)."""
    lt = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def box_iou_batched(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """``(..., N, M)`` IoUs of ``(..., N, 4)`` and ``(..., M, 4)`` boxes: ``torchvision.ops.box_iou`` (which
    takes one set of each) with leading batch dimensions, the same arithmetic in the same order, so the same
    values to the bit."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    inter = pairwise_intersection(boxes1, boxes2)
    return inter / (area1[..., :, None] + area2[..., None, :] - inter)


def pairwise_ioa(regions: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(..., M, N) intersection of ``regions[..., m, :]`` and ``boxes[..., n, :]`` divided by the area of
    ``boxes[..., n, :]``.

    Used for crowd regions: a box this much inside a crowd box is neither clearly background nor a
    single object.
    """
    inter = pairwise_intersection(regions, boxes)
    area = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).clamp(min=1e-6)
    return inter / area[..., None, :]


def crowd_mask(crowd_boxes: torch.Tensor | None, boxes: torch.Tensor, thresh: float,
               crowd_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mask ``(..., N)`` of ``boxes`` ``(..., N, 4)`` that lie ``>= thresh`` inside some crowd box
    ``(..., M, 4)`` (all False without crowd boxes); ``crowd_valid`` ``(..., M)``: which crowd boxes are
    real, where they are padded per image (``pad_stack``)."""
    if crowd_boxes is None or crowd_boxes.numel() == 0 or boxes.numel() == 0:
        return torch.zeros(boxes.shape[:-1], dtype=torch.bool, device=boxes.device)
    ioa = pairwise_ioa(crowd_boxes.to(device=boxes.device, dtype=torch.float32), boxes.float())
    if crowd_valid is not None:
        ioa = ioa.masked_fill(~crowd_valid[..., None], -math.inf)
    return ioa.amax(dim=-2) >= thresh


def smooth_l1(input: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Element-wise smooth L1 (Huber / beta); ``beta`` 0 is plain L1. Not reduced."""
    diff = (input.float() - target.float()).abs()
    if beta < 1e-5:
        return diff
    return torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
