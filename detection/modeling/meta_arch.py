"""Faster R-CNN as a whole: normalise the batch, trunk (+ neck), RPN, RoI heads.

``forward(batch)`` takes the data pipeline's batch dict:

* ``images``: uint8 (B, 3, H, W), RGB, each image at the top-left, zero-padded to a common size;
* ``image_sizes``: the unpadded ``(h, w)`` of each image;
* ``targets`` (training): per image ``boxes`` float (N, 4) xyxy pixels, ``labels`` int64 (N,) in 1..K,
  and optionally ``crowd_boxes`` (M, 4). In evaluation a target may carry the image's frame instead
  (``orig_size``, ``scale``, ``flipped``, as the data pipeline records them).

Training returns the loss dict (``loss_rpn_cls``, ``loss_rpn_loc``, ``loss_cls``, ``loss_box_reg``);
evaluation returns per image ``{"boxes", "scores", "labels"}``, in the original image's pixels (clipped
to it) where the target carries its frame, else in the pixels of the network's input
(:mod:`detection.modeling.postprocessing`).

Pixels are normalised as ``(x - mean) / std`` inside each image's own area; the padding is 0 after
normalisation, as if the padding had been added to the normalised image (Detectron2's order).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from backbones.resnet import is_channels_last

from .box_ops import ImageSizes
from .postprocessing import detections_to_image
from .roi_heads import PaddedDetections, postprocess_padded


class GeneralizedRCNN(nn.Module):
    def __init__(self, trunk: nn.Module, rpn: nn.Module, roi_heads: nn.Module, pixel_mean: Sequence[float],
                 pixel_std: Sequence[float], neck: nn.Module | None = None,
                 rpn_in_features: Sequence[str] | None = None):
        super().__init__()
        self.trunk = trunk
        self.neck = neck
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.rpn_in_features = list(rpn_in_features) if rpn_in_features is not None else None
        self.register_buffer("pixel_mean", torch.tensor(list(pixel_mean), dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(list(pixel_std), dtype=torch.float32).view(-1, 1, 1))

    def set_sampling_generator(self, generator: torch.Generator | None) -> None:
        """The generator the RPN and the RoI heads draw their training samples from (None: the global one).
        The trainer sets one per iteration, so a resumed run samples exactly as an uninterrupted one."""
        self.rpn.generator = self.roi_heads.generator = generator

    def compile_parts(self, **options) -> list[str]:
        """``torch.compile`` the dense parts in place: the trunk, the neck, the RPN's convolutions and the box
        head's layers (res5 per RoI in C4). ``nn.Module.compile`` keeps parameter names, so checkpoints stay
        interchangeable. The RPN's and RoI heads' bookkeeping stays eager: its sizes depend on the data.
        Shapes are left to PyTorch's automatic dynamism: a second image size (or RoI count) recompiles once
        with symbolic sizes instead of once per size. ``options`` go to ``torch.compile`` (``mode=
        "reduce-overhead"``: CUDA graphs of the compiled parts, one per input size). Returns the names of the
        parts compiled."""
        parts = {"trunk": self.trunk, "neck": self.neck, "RPN head": self.rpn.head,
                 "box head": self.roi_heads.dense_layers()}
        for part in parts.values():
            if part is not None:
                part.compile(**options)
        return [name for name, part in parts.items() if part is not None]

    def preprocess(self, images: torch.Tensor, image_sizes: ImageSizes) -> torch.Tensor:
        images = images.to(self.pixel_mean.device, non_blocking=True)
        x = (images.float() - self.pixel_mean) / self.pixel_std
        height, width = x.shape[-2:]
        if isinstance(image_sizes, torch.Tensor):  # on the device (padded_detections): one mask, no constants
            rows = torch.arange(height, device=x.device) < image_sizes[:, :1]  # (B, H)
            cols = torch.arange(width, device=x.device) < image_sizes[:, 1:]  # (B, W)
            x = torch.where((rows[:, :, None] & cols[:, None, :])[:, None], x, 0.0)
        else:
            for i, (h, w) in enumerate(image_sizes):
                if h < height:
                    x[i, :, h:, :] = 0
                if w < width:
                    x[i, :, :, w:] = 0
        if is_channels_last(self.trunk):
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised images -> named feature maps (trunk, then the neck if any)."""
        features = self.trunk(images)
        return self.neck(features) if self.neck is not None else features

    def rpn_inputs(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [features[f] for f in self.rpn_in_features] if self.rpn_in_features else list(features.values())

    @property
    def waits_nowhere_in_inference(self) -> bool:
        """Whether inference makes no host synchronisation before its end: the NMS as Triton kernels in the RPN
        and in post-processing (``model.nms_kernel=triton``)."""
        return self.rpn.nms_kernel == "triton" and self.roi_heads.box_predictor.nms_kernel == "triton"

    @torch.no_grad()
    def padded_detections(self, images: torch.Tensor, image_sizes: ImageSizes) -> PaddedDetections:
        """Inference from the uint8 images to each image's detections in the network input's pixels, padded to
        a fixed size, with no host synchronisation (``model.nms_kernel=triton``; on a GPU also
        ``sizes_follow_data``'s fixed sizes): what a CUDA graph captures (:mod:`.graphed`). ``image_sizes``
        as a ``(B, 2)`` integer tensor on the images' device makes them an input of the graph, not constants
        recorded in it (the padding's mask, the clipping, the global context's boxes): one graph then serves
        every batch of the same padded shape. The same detections as with the sizes as numbers."""
        predictor = self.roi_heads.box_predictor
        if not self.waits_nowhere_in_inference:
            raise ValueError("padded_detections needs the NMS without host synchronisation: model.nms_kernel=triton")
        features = self.features(self.preprocess(images, image_sizes))
        proposals, _ = self.rpn(self.rpn_inputs(features), image_sizes)
        class_logits, box_deltas = self.roi_heads.predict(features, proposals, image_sizes)
        return postprocess_padded(**predictor.candidates(class_logits, box_deltas, proposals, image_sizes))

    def forward(self, batch: dict):
        image_sizes = [(int(h), int(w)) for h, w in batch["image_sizes"]]
        features = self.features(self.preprocess(batch["images"], image_sizes))
        targets = batch.get("targets") if self.training else None
        if self.training and targets is None:
            raise ValueError("GeneralizedRCNN: training needs batch['targets']")
        proposals, rpn_losses = self.rpn(self.rpn_inputs(features), image_sizes, targets)
        detections, head_losses = self.roi_heads(features, proposals, image_sizes, targets)
        if self.training:
            return {**rpn_losses, **head_losses}
        return detections_to_image(detections, batch.get("targets"))
