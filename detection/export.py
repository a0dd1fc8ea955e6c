"""A trained detector as one self-contained graph: image in, boxes in the image's own pixels out.

``DeployableDetector`` wraps a ``GeneralizedRCNN`` with the test-time pre- and post-processing of the
data pipeline, so an exported file needs nothing from resdet to run:

* input: one RGB image, ``uint8`` tensor ``(3, H, W)``, any ``H`` and ``W`` (dynamic in the export);
* resize so the shorter side is ``min_size`` unless the longer would exceed ``max_size``
  (:func:`detection.data.transforms.resized_shape`, bilinear like the pipeline's OpenCV resize),
  normalise, zero-pad to a multiple of the backbone's stride;
* the trunk, RPN and RoI heads of the trained model;
* boxes divided by the resize scale and clipped to the original image.

Output: ``boxes`` float32 ``(N, 4)`` xyxy in input-image pixels, ``scores`` float32 ``(N,)``,
``labels`` int64 ``(N,)`` in ``1..K`` (index into the run's class names, 1-based as in training),
sorted by decreasing score.

One image per call: a deployment server batches requests itself, and a fixed batch of one keeps the
graph free of per-image padding logic. Formats (:data:`EXPORT_FORMATS`): ``torch_export`` (a ``.pt2``
``ExportedProgram``, ``torch.export.load``) and ``onnx`` (written from the same exported program by
``torch.onnx``, run with onnxruntime). No TorchScript: PyTorch 2.14 deprecates ``torch.jit`` in favour of
``torch.export``, and a traced graph would fix the image size. The run's class names travel inside the
file (ONNX metadata ``resdet``, the ``.pt2``'s extra file ``resdet.json``).

What differs from ``tools/eval_det.py``: the resize is ``F.interpolate`` on float pixels where the data
pipeline uses OpenCV on uint8 (a fraction of a grey level apart); images narrower than about 1:5 are
padded to two cells of the coarsest feature map; box refinement, voting and test-time augmentation
(``eval.*``) are evaluation-time options and not in the graph.
"""
from __future__ import annotations

import json

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from backbones.engine.errors import ResdetError
from backbones.engine.imageio import CorruptImageError, read_image_rgb

from .data.build import build_datasets
from .data.transforms import resized_shape
from .modeling.meta_arch import GeneralizedRCNN
from .modeling.postprocessing import boxes_to_image


@torch.library.register_fake("torchvision::nms", allow_override=True)
def _nms_fake(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """The size of NMS's output for ``torch.export``: 0 .. number of boxes. torchvision 0.29's own fake
    kernel asks for a size of at least 2 (``create_unbacked_symint``'s default), so the exported graph
    asserted that every image keeps two proposals and two detections, and failed on the ones that do not."""
    torch._check(boxes.dim() == 2 and boxes.size(1) == 4, lambda: f"nms: boxes must be (N, 4), got {boxes.shape}")
    torch._check(scores.dim() == 1 and scores.size(0) == boxes.size(0), lambda: "nms: one score per box")
    kept = torch.library.get_ctx().new_dynamic_size(min=0)
    torch._check(kept <= boxes.size(0))
    return boxes.new_empty(kept, dtype=torch.long)


def opaque_size(size):
    """``size`` as a new symbol of the exported graph (an int stays an int).

    Traced as it is, the resized side is an expression of the input's height and width (the scale's min and
    max, a float product, a rounding), and every stride-2 layer nests it in one more floor division: a
    thousand characters per tensor shape by res4, which ``torch.export.load`` parsed with sympy for 24 s
    before the first image (a width-16 ResNet-18). Read back as a number the value is the same at run time,
    but the graph knows it only as ``u >= 1``, so the shapes after it stay short (load in 4 s)."""
    if not isinstance(size, torch.SymInt):
        return size
    opaque = torch.scalar_tensor(size, dtype=torch.long).item()
    torch._check(opaque >= 1)
    return opaque


class DeployableDetector(nn.Module):
    def __init__(self, model: GeneralizedRCNN, min_size: int, max_size: int, size_divisibility: int):
        super().__init__()
        self.model = model.eval()
        self.min_size, self.max_size = int(min_size), int(max_size)
        self.size_divisibility = int(size_divisibility)
        coarsest = max(model.rpn.anchor_generator.strides)
        self.min_padded_side = -(-2 * coarsest // self.size_divisibility) * self.size_divisibility

    @classmethod
    def from_config(cls, model: GeneralizedRCNN, cfg: DictConfig) -> "DeployableDetector":
        """At the run's test-time sizes (``data.min_size_test``, ``max_size_test``, ``size_divisibility``)."""
        d = cfg.data
        return cls(model, d.min_size_test, d.max_size_test, d.size_divisibility)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        height, width = image.shape[-2:]
        new_h, new_w = (opaque_size(n) for n in resized_shape(height, width, self.min_size, self.max_size))
        model = self.model
        x = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bilinear", align_corners=False)
        x = (x - model.pixel_mean) / model.pixel_std
        # zero-pad to a multiple of the stride, and to at least two cells of the coarsest feature map: a
        # one-cell map would need a broadcasting branch the exported graph does not have (only images over
        # about 5:1 at the usual sizes are padded more than the data pipeline pads them)
        d, least = self.size_divisibility, self.min_padded_side
        pad_h, pad_w = (d * opaque_size(torch.sym_max(least // d, (n + d - 1) // d)) for n in (new_h, new_w))
        torch._check(pad_h >= new_h)  # true by construction; the graph cannot see it through the new symbols
        torch._check(pad_w >= new_w)
        x = F.pad(x, (0, pad_w - new_w, 0, pad_h - new_h))
        features = model.features(x)
        image_sizes = [(new_h, new_w)]
        proposals, _ = model.rpn(model.rpn_inputs(features), image_sizes)
        detections, _ = model.roi_heads(features, proposals, image_sizes)
        det = detections[0]
        scale = (torch.sym_float(new_h) / height, torch.sym_float(new_w) / width)  # network input / original
        return boxes_to_image(det["boxes"], (height, width), scale), det["scores"], det["labels"]


SUFFIXES = {"onnx": ".onnx", "torch_export": ".pt2"}
EXPORT_FORMATS = tuple(SUFFIXES)


def export_program(deployable: DeployableDetector, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` with the image height and width dynamic (8 .. 16384 pixels)."""
    height, width = torch.export.Dim("height", min=8, max=16384), torch.export.Dim("width", min=8, max=16384)
    with torch.no_grad():
        return torch.export.export(deployable.eval(), (example,), dynamic_shapes={"image": {1: height, 2: width}},
                                   strict=False)


def _roi_pool_onnx(features, rois, spatial_scale: float, pooled_height: int, pooled_width: int):
    """``torchvision::roi_pool`` as ONNX ``MaxRoiPool`` (Fast R-CNN's RoI pooling, the same quantised bins;
    rois ``(R, 5)`` as batch index, x1, y1, x2, y2 in both). onnxscript 0.7's own lowering takes the Python
    API's arguments, not the operator's five, and fails on every RoIPool model (the paper's R101-C4 config).
    The operator's second output, the argmax for its backward, is never read in inference."""
    from onnxscript import opset20 as op

    pooled = op.MaxRoiPool(features, rois, pooled_shape=[pooled_height, pooled_width], spatial_scale=spatial_scale)
    return pooled, op.Constant(value_ints=[0])


def save_exported(program: torch.export.ExportedProgram, example: torch.Tensor, path: str, fmt: str,
                  metadata: dict) -> None:
    """Write ``program`` as ``fmt`` with ``metadata`` (class names, sizes, source) inside the file."""
    if fmt == "torch_export":
        torch.export.save(program, path, extra_files={"resdet.json": json.dumps(metadata)})
    elif fmt == "onnx":
        import onnx  # the exporter's own dependency (pip install 'resdet[export]')

        torch.onnx.export(program, (example,), path, dynamo=True, external_data=False, input_names=["image"],
                          output_names=["boxes", "scores", "labels"], verbose=False,
                          custom_translation_table={torch.ops.torchvision.roi_pool.default: _roi_pool_onnx})
        model = onnx.load(path)
        entry = model.metadata_props.add()
        entry.key, entry.value = "resdet", json.dumps(metadata)
        onnx.save(model, path)
    else:
        raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {fmt!r}")


def load_exported(path: str):
    """An exported file as ``(run, metadata)``: ``run(image uint8 (3, H, W) numpy or tensor)`` gives
    ``(boxes, scores, labels)`` numpy arrays. ONNX files run on onnxruntime's CPU provider."""
    if path.endswith(".onnx"):
        import onnx
        import onnxruntime

        metadata = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

        def run_onnx(image):
            image = image.numpy() if isinstance(image, torch.Tensor) else image
            return tuple(session.run(None, {"image": image}))
        return run_onnx, json.loads(metadata.get("resdet", "{}"))
    extra = {"resdet.json": ""}
    module = torch.export.load(path, extra_files=extra).module()

    def run_program(image):
        image = torch.as_tensor(image)
        with torch.no_grad():
            return tuple(t.numpy() for t in module(image))
    return run_program, json.loads(extra["resdet.json"] or "{}")


def sample_val_images(cfg: DictConfig, limit: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """``(path, RGB array)`` of up to ``limit`` readable images of the run's val set (any data format), to
    check an exported file against PyTorch; else one random image at the test size ("random": the val set
    is not on this machine, or ``limit`` is 0)."""
    images = []
    if limit > 0:
        quick = cfg.copy()  # a few images are read: no need to open every one first
        OmegaConf.update(quick, "data.verify_images", "none")
        OmegaConf.update(quick, "data.strict_val", False)
        try:
            _, val_set = build_datasets(quick, train=False)
        except (ResdetError, OSError):
            val_set = None
        for record in val_set.records if val_set is not None else []:
            if len(images) >= limit:
                break
            try:
                images.append((val_set.image_path(record), read_image_rgb(val_set.image_path(record))))
            except CorruptImageError:
                continue
    if not images:
        size = cfg.data.min_size_test
        rng = np.random.default_rng(seed)
        images.append(("random", rng.integers(0, 256, (size, size * 4 // 3, 3), dtype=np.uint8)))
    return images
