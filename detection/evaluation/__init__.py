"""Detection evaluation: COCO box AP (pycocotools) and PASCAL VOC / ImageNet DET AP (devkit semantics)."""
from .coco_eval import METRIC_NAMES, COCOEvaluator, format_metrics_table, format_per_class_table
from .voc_eval import VOCEvaluator, format_voc_metrics_table, ground_truth_from_coco, voc07_ap, voc_ap

__all__ = ["METRIC_NAMES", "COCOEvaluator", "format_metrics_table", "format_per_class_table", "VOCEvaluator",
           "format_voc_metrics_table", "ground_truth_from_coco", "voc07_ap", "voc_ap"]
