"""Assign each prediction (anchor or proposal) to its best ground-truth box and a match label.

``thresholds`` split the IoU range into intervals, ``labels`` give each interval its meaning:
``Matcher([0.3, 0.7], [0, -1, 1])`` makes IoU < 0.3 background (0), 0.3 <= IoU < 0.7 ignored (-1)
and IoU >= 0.7 foreground (1). With ``allow_low_quality_matches``, each ground-truth box's
highest-IoU predictions (all of them when tied) become foreground as well, so that every object
gets at least one positive, as in Faster R-CNN. Results equal torchvision's ``Matcher`` except for
a ground truth whose best IoU is 0, which gets no low-quality match here.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


class Matcher:
    def __init__(self, thresholds: Sequence[float], labels: Sequence[int], allow_low_quality_matches: bool = False):
        thresholds = [float(t) for t in thresholds]
        if any(a > b for a, b in zip(thresholds[:-1], thresholds[1:])):
            raise ValueError(f"Matcher thresholds must be increasing, got {thresholds}")
        if len(labels) != len(thresholds) + 1:
            raise ValueError(f"Matcher needs one label per IoU interval: {len(thresholds)} thresholds make "
                             f"{len(thresholds) + 1} intervals, got labels {list(labels)}")
        if any(lab not in (-1, 0, 1) for lab in labels):
            raise ValueError("Matcher labels must be -1 (ignore), 0 (background) or 1 (foreground), "
                             f"got {list(labels)}")
        self.thresholds = [-math.inf] + thresholds + [math.inf]
        self.labels = [int(lab) for lab in labels]
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, match_quality_matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``match_quality_matrix``: (num_gt, num_predictions) IoUs, or (..., num_gt, num_predictions) for
        a batch of images, each matched on its own (an image's rows that are not ground truth, padding to
        the batch's longest list, must hold -1: they then match nothing).

        Returns ``(matched_idx, match_labels)``, both (..., num_predictions): the index of the best ground
        truth (0 when there is none) and its label (1, 0 or -1, int8).
        """
        *batch, num_gt, num_pred = match_quality_matrix.shape
        device = match_quality_matrix.device
        if num_gt == 0:
            return (torch.zeros(*batch, num_pred, dtype=torch.int64, device=device),
                    torch.full((*batch, num_pred), self.labels[0], dtype=torch.int8, device=device))
        best_iou, matched_idx = match_quality_matrix.max(dim=-2)  # ties: the first ground truth, as per image
        match_labels = torch.empty(*batch, num_pred, dtype=torch.int8, device=device)
        for label, low, high in zip(self.labels, self.thresholds[:-1], self.thresholds[1:]):
            match_labels.masked_fill_((best_iou >= low) & (best_iou < high), label)  # not x[mask] =: no host sync
        if self.allow_low_quality_matches:
            # A ground truth that overlaps nothing (e.g. a degenerate box) would otherwise turn every
            # prediction it ties with at IoU 0 into a positive; torchvision does that, we do not. Padding
            # rows (-1) are left out the same way.
            best_per_gt = match_quality_matrix.max(dim=-1).values
            best_per_gt = torch.where(best_per_gt > 0, best_per_gt, torch.full_like(best_per_gt, math.nan))
            # a mask over predictions, not torchvision's nonzero: the same positives without a host sync
            match_labels.masked_fill_((match_quality_matrix == best_per_gt[..., None]).any(dim=-2), 1)
        return matched_idx, match_labels
