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

One graph per padded batch shape, recorded at its first batch after two eager warm-up runs (Triton compiles
its kernels and cuDNN picks its algorithms there). The images' own sizes are an input of the graph (a tensor
on the device that each replay overwrites, like the images), not constants recorded in it, so images of
different sizes padded to the same shape share a graph: COCO's images at the test size (800, at most 1333),
padded to multiples of 32, take 30 padded shapes for 53 sizes in coco128 at batch 1, and the 16 most frequent
shapes hold 114 of its 128 images (the 16 most frequent sizes: 91). After ``max_graphs`` graphs the other
shapes run the same padded inference eagerly. A graph that cannot be recorded (an operation CUDA graphs do not
allow) says why once in the log and leaves its shape eager too; ``strict`` raises instead (the benches and
``bench/cuda_check.py``). The weights must not change once a graph is recorded (the graph reads the
parameters and the folded BN weights where they were): for a loaded model (``tools/eval_det.py``,
``Predictor``), not for evaluation during training. Off CUDA the padded inference runs eagerly.
"""
from __future__ import annotations

import torch
from torch import nn

from backbones.engine.errors import ConfigError
from backbones.engine.run import get_logger

from .postprocessing import detections_to_image
from .roi_heads import PaddedDetections


class GraphedDetector(nn.Module):
    """``GeneralizedRCNN`` in evaluation, ``forward(batch)`` as the detector's (detections per image, in the
    original image's pixels where the batch's targets carry its frame), replayed from a CUDA graph per padded
    batch shape on a GPU."""

    def __init__(self, model: nn.Module, warmup: int = 2, max_graphs: int = 16, strict: bool = False):
        super().__init__()
        if not model.waits_nowhere_in_inference:
            raise ConfigError("eval.cuda_graphs records the whole inference, which the host must not wait in: it "
                              "needs the NMS without host synchronisation; fix: model.nms_kernel=triton")
        self.model = model
        self.warmup, self.max_graphs, self.strict = warmup, max_graphs, strict
        self.graphs: dict[tuple, tuple] = {}
        self.eager: set[tuple] = set()  # shapes that run eagerly: over max_graphs, or their recording failed
        self.full = False  # max_graphs reached (said once)
        self.pool = None

    @torch.no_grad()
    def forward(self, batch: dict) -> list[dict[str, torch.Tensor]]:
        if self.model.training:
            raise RuntimeError("GraphedDetector runs inference only: call .eval() first")
        images = batch["images"]
        sizes = torch.tensor([(int(h), int(w)) for h, w in batch["image_sizes"]], dtype=torch.int64)
        padded = self.replay(images, sizes) if images.device.type == "cuda" else None
        if padded is None:
            padded = self.model.padded_detections(images, sizes.to(images.device))
            return detections_to_image(padded.unpad(), batch.get("targets"))
        return detections_to_image(padded.unpad(copy=True), batch.get("targets"))

    def replay(self, images: torch.Tensor, sizes: torch.Tensor) -> PaddedDetections | None:
        """The graph's padded detections for these images of these ``(B, 2)`` sizes (on the host), recorded
        first if their shape is new, or None: run eagerly."""
        key = (tuple(images.shape), images.dtype, images.device, torch.is_autocast_enabled("cuda"),
               torch.get_autocast_dtype("cuda"))
        if key in self.eager:
            return None
        if key not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                if not self.full:
                    get_logger().info("CUDA graphs: %d recorded (GraphedDetector.max_graphs); batches of other "
                                      "padded shapes run eagerly", len(self.graphs))
                self.full = True
                self.eager.add(key)
                return None
            try:
                self.graphs[key] = self.record(images, sizes)
            except RuntimeError as exc:
                if self.strict:
                    raise
                get_logger().warning("CUDA graph of batch %s not recorded (%s: %s); running it eagerly",
                                     tuple(images.shape), type(exc).__name__, str(exc).splitlines()[0])
                self.eager.add(key)
                return None
        static_images, static_sizes, graph, padded, _ = self.graphs[key]
        static_images.copy_(images)
        # from pinned memory, queued: a copy from pageable memory would make the host wait for the stream
        static_sizes.copy_(sizes.pin_memory() if static_sizes.is_cuda else sizes, non_blocking=True)
        graph.replay()
        return padded

    def record(self, images: torch.Tensor, sizes: torch.Tensor) -> tuple:
        static_images, static_sizes = images.clone(), sizes.to(images.device)
        side = torch.cuda.Stream(images.device)
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture asks
            for _ in range(self.warmup):
                self.model.padded_detections(static_images, static_sizes)
        torch.cuda.current_stream(images.device).wait_stream(side)
        if self.pool is None:
            # one memory pool for every graph: each call replays one graph and copies its outputs before the
            # next replay, so one graph overwriting another's freed temporaries (or outputs) harms nothing
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: the data loader's pin-memory thread may allocate or copy meanwhile, which is harmless
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            padded = self.model.padded_detections(static_images, static_sizes)
        # the anchors the graph reads live in the anchor generator's cache, which may drop them for other
        # sizes: held here, their memory cannot be handed to another tensor while the graph reads it
        anchors = tuple(self.model.rpn.anchor_generator._cache.values())
        return static_images, static_sizes, graph, padded, anchors
