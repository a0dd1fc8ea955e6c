"""Detection data: validated COCO-format and VOC / ImageNet DET XML datasets, transforms, batching, synthetic
shapes, and ``build.py``, the table of formats (``FORMATS``: how each one prepares its files, builds its sets,
names its source and makes its evaluators). Imports ``backbones`` and, in ``build.py`` only,
``detection.evaluation``; never the model or the training code."""
from .batching import GroupedBatchSampler, InferenceBatchSampler, build_batch_sampler, collate_detection
from .coco import CocoDetection, DatasetError
from .synthetic import make_synthetic_coco, make_synthetic_voc
from .transforms import DetectionTransform, build_transform, resized_shape
from .voc import VOC_CLASSES, VocDetection, voc_to_coco_dict

__all__ = [
    "GroupedBatchSampler", "InferenceBatchSampler", "build_batch_sampler", "collate_detection", "CocoDetection",
    "DatasetError", "make_synthetic_coco", "DetectionTransform", "build_transform",
    "resized_shape", "make_synthetic_voc", "VOC_CLASSES", "VocDetection", "voc_to_coco_dict",
]
