"""COCO box evaluation (pycocotools) for detection."""
from .coco_eval import METRIC_NAMES, COCOEvaluator, format_metrics_table, format_per_class_table

__all__ = ["METRIC_NAMES", "COCOEvaluator", "format_metrics_table", "format_per_class_table"]
