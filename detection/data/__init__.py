"""COCO-format data for detection: validated dataset, transforms, batching, synthetic shapes."""
from .batching import GroupedBatchSampler, InferenceBatchSampler, build_batch_sampler, collate_detection
from .coco import CocoDetection, DatasetError
from .synthetic import make_synthetic_coco
from .transforms import DetectionTransform, boxes_to_original, build_transform, resized_shape

__all__ = [
    "GroupedBatchSampler", "InferenceBatchSampler", "build_batch_sampler", "collate_detection", "CocoDetection",
    "DatasetError", "make_synthetic_coco", "DetectionTransform", "boxes_to_original", "build_transform",
    "resized_shape",
]
