"""Detection evaluation: COCO box AP (pycocotools) and PASCAL VOC / ImageNet DET AP (devkit semantics).

Every evaluator has ``reset()``, ``process(targets, detections)`` (detections in original image pixels)
and ``evaluate()`` (gathered over ranks, scored on rank 0) and a ``name``; ``loop.py`` is the one loop that
runs a detector over a loader and feeds them; ``tables.py`` formats what they return and ``report.py``
draws the evaluation page. Imports ``backbones.engine`` and ``detection.visualize``; never the data formats,
the model or the training code (the detector itself returns boxes in the image files' pixels)."""
from .coco_eval import COCOEvaluator
from .tables import METRIC_NAMES, format_metrics_table, format_per_class_table, format_voc_metrics_table
from .voc_eval import VOCEvaluator, ground_truth_from_coco, voc07_ap, voc_ap

__all__ = ["METRIC_NAMES", "COCOEvaluator", "format_metrics_table", "format_per_class_table", "VOCEvaluator",
           "format_voc_metrics_table", "ground_truth_from_coco", "voc07_ap", "voc_ap"]
