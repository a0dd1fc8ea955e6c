"""A trained detector's inference replayed as CUDA graphs (``eval.cuda_graphs``): one launch per batch.

At batch 1 a GPU spends most of an inference waiting for the host to launch its kernels one by one (issue 9:
R101-C4 about 1,300 launches, R50-FPN about 370 operators, a few microseconds of host time each), and every
host synchronisation empties its queue. With the NMS that needs no synchronisation (``model.nms_kernel=triton``)
the whole inference, from the uint8 images to each image's detections padded to a fixed size
(``GeneralizedRCNN.padded_detections``), makes the host wait nowhere, so it can be recorded once as a CUDA
graph and replayed: one launch for the whole detector, and one wait at the end, for the number of detections.
torch.compile's ``reduce-overhead`` mode graphs only the dense parts it compiles (``compile_parts``); the
bookkeeping between them (RPN decoding and selection, pooling, post-processing: about 200 of R50-FPN's
operators) stays eager.

One graph per batch shape and image sizes (the data pipeline pads a batch to a few sizes: ``data.
size_divisibility``), recorded at its first batch after two eager warm-up runs (Triton compiles its kernels and
cuDNN picks its algorithms there). The weights must not change once a graph is recorded (the graph reads the
parameters and the folded BN weights where they were): for a loaded model (``tools/eval_det.py``,
``Predictor``), not for evaluation during training. Off CUDA the same padded inference runs eagerly.
"""
from __future__ import annotations

import torch
from torch import nn

from backbones.engine.errors import ConfigError

from .postprocessing import detections_to_image
from .roi_heads import PaddedDetections


class GraphedDetector(nn.Module):
    """``GeneralizedRCNN`` in evaluation, ``forward(batch)`` as the detector's (detections per image, in the
    original image's pixels where the batch's targets carry its frame), replayed from a CUDA graph per batch
    shape on a GPU."""

    def __init__(self, model: nn.Module, warmup: int = 2):
        super().__init__()
        if model.rpn.nms_kernel != "triton" or model.roi_heads.box_predictor.nms_kernel != "triton":
            raise ConfigError("eval.cuda_graphs records the whole inference, which the host must not wait in: it "
                              "needs the NMS without host synchronisation; fix: model.nms_kernel=triton")
        self.model = model
        self.warmup = warmup
        self.graphs: dict[tuple, tuple] = {}
        self.pool = None

    @torch.no_grad()
    def forward(self, batch: dict) -> list[dict[str, torch.Tensor]]:
        if self.model.training:
            raise RuntimeError("GraphedDetector runs inference only: call .eval() first")
        images = batch["images"]
        sizes = [(int(h), int(w)) for h, w in batch["image_sizes"]]
        if images.device.type != "cuda":
            padded = self.model.padded_detections(images, sizes)
        else:
            padded = self.replay(images, sizes)
        return detections_to_image(padded.unpad(copy=images.device.type == "cuda"), batch.get("targets"))

    def replay(self, images: torch.Tensor, sizes: list[tuple[int, int]]) -> PaddedDetections:
        key = (tuple(images.shape), images.dtype, images.device, tuple(sizes), torch.is_autocast_enabled("cuda"),
               torch.get_autocast_dtype("cuda"))
        if key not in self.graphs:
            self.graphs[key] = self.record(images, sizes)
        static_images, graph, padded, _ = self.graphs[key]
        static_images.copy_(images)
        graph.replay()
        return padded

    def record(self, images: torch.Tensor, sizes: list[tuple[int, int]]) -> tuple:
        static_images = images.clone()
        side = torch.cuda.Stream(images.device)
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture asks
            for _ in range(self.warmup):
                self.model.padded_detections(static_images, sizes)
        torch.cuda.current_stream(images.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            padded = self.model.padded_detections(static_images, sizes)
        # the anchors the graph reads live in the anchor generator's cache, which may drop them for other
        # sizes: held here, their memory cannot be handed to another tensor while the graph reads it
        anchors = tuple(self.model.rpn.anchor_generator._cache.values())
        return static_images, graph, padded, anchors
