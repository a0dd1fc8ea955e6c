"""The ResNet family's fixed choices, as config enums (shared by every application's schema)."""
from __future__ import annotations

from .engine.config import Choice


class Shortcut(Choice):
    A = "A"  # zero-padding identity where the shape changes
    B = "B"  # projection where the shape changes, identity elsewhere
    C = "C"  # projection everywhere


class Norm(Choice):
    bn = "bn"
    frozen_bn = "frozen_bn"  # statistics and affine fixed (detection fine-tuning)
    sync_bn = "sync_bn"  # statistics over all ranks under torchrun
