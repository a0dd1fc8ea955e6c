"""Backbone checkpoints: the file pretraining hands to detection, and weights from elsewhere
(torchvision here; MSRA, Detectron2 and the safe reading of pickles in :mod:`backbones.foreign_weights`).

A backbone checkpoint is a plain dict (loadable with ``torch.load(weights_only=True)``)::

    {"format": "resdet-backbone/1", "arch": {...ResNet constructor args...},
     "state_dict": {...}, "normalization": {"mean": [..], "std": [..]},
     "class_names": [...], "config": "<resolved YAML of the run>"}
"""
from __future__ import annotations

import logging
import os
import re
from collections import Counter

from torch import nn

from .engine.errors import CheckpointError  # noqa: F401  (raised here; importers take it from here too)
from .resnet import ResNet

logger = logging.getLogger(__name__)
FORMAT = "resdet-backbone/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def backbone_checkpoint(model: ResNet, mean, std, class_names, config_yaml: str = "") -> dict:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {
        "format": FORMAT,
        "arch": dict(model.arch, num_classes=model.num_classes),
        "state_dict": state,
        "normalization": {"mean": [float(x) for x in mean], "std": [float(x) for x in std]},
        "class_names": list(class_names),
        "config": config_yaml,
    }


_TV_STAGE = re.compile(r"^layer(\d)\.")


def convert_torchvision_state_dict(tv_state: dict) -> tuple[dict, dict]:
    """Map a torchvision ``ResNet`` state_dict to this package's names.

    Returns ``(state_dict, arch)``; ``arch`` holds the constructor arguments that reproduce the
    torchvision net (its stride sits in the 3x3, so ``stride_in_1x1=False``).
    """
    if "conv1.weight" not in tv_state or "layer1.0.conv1.weight" not in tv_state:
        raise CheckpointError(
            "not a torchvision ResNet state_dict: expected keys 'conv1.weight' and 'layer1.0.conv1.weight'"
        )
    out = {}
    blocks = Counter()
    for key, value in tv_state.items():
        new = key
        if key.startswith("conv1."):
            new = "stem.conv." + key[len("conv1."):]
        elif key.startswith("bn1."):
            new = "stem.bn." + key[len("bn1."):]
        elif m := _TV_STAGE.match(key):
            new = f"res{int(m.group(1)) + 1}." + key[m.end():]
            new = new.replace(".downsample.0.", ".shortcut.conv.").replace(".downsample.1.", ".shortcut.bn.")
            blocks[int(m.group(1))] = max(blocks[int(m.group(1))], int(key.split(".")[1]) + 1)
        out[new] = value
    block = "bottleneck" if "layer1.0.conv3.weight" in tv_state else "basic"
    arch = dict(
        block=block,
        stage_blocks=[blocks[i] for i in range(1, 5)],
        shortcut="B",
        base_width=int(tv_state["conv1.weight"].shape[0]),
        stride_in_1x1=False,
        cifar=False,
        num_classes=int(tv_state["fc.weight"].shape[0]) if "fc.weight" in tv_state else 0,
    )
    return out, arch


def read_backbone_checkpoint(path: str | os.PathLike) -> dict:
    """Load a resdet backbone checkpoint, or ResNet weights from elsewhere converted to one: the MSRA
    models of the paper (Detectron's ``R-50.pkl`` ...), Detectron2 checkpoints, torchvision / timm state
    dicts (:mod:`backbones.foreign_weights`; pickles are read with a restricted unpickler). The layout is
    recognised by its keys and logged with the normalisation it implies."""
    from .foreign_weights import (WeightsFormatError, convert_detectron2, convert_msra, detect_layout,
                                  read_weights_file)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: backbone checkpoint not found")
    try:
        obj = read_weights_file(path)
    except WeightsFormatError as exc:
        raise CheckpointError(str(exc)) from exc
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return obj
    if isinstance(obj, dict) and "model" in obj and isinstance(obj.get("backbone"), dict):
        return obj["backbone"]  # a full pretraining training state also carries the backbone part
    layout, weights = detect_layout(obj)
    try:
        if layout == "msra":
            state, arch, normalization = convert_msra(weights, path)
            how = "BGR -> RGB first conv, MSRA mean, std 1 on 0-255 pixels, stride in the 1x1"
        elif layout == "detectron2":
            state, arch, normalization = convert_detectron2(weights, path)
            how = "BGR -> RGB first conv, Detectron2's BGR mean, std 1 on 0-255 pixels, stride in the 1x1"
        elif layout == "torchvision":
            state, arch = convert_torchvision_state_dict(weights)
            normalization = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
            how = "RGB, ImageNet mean/std, stride in the 3x3 (model.backbone.stride_in_1x1=false)"
        else:
            keys = sorted(weights)[:8] if isinstance(weights, dict) else []
            raise CheckpointError(
                f"{path}: neither a resdet backbone checkpoint (format {FORMAT!r}) nor ResNet weights in a known layout "
                f"(MSRA/Detectron conv1_w, res2_0_branch2a_w; Detectron2 backbone.bottom_up.stem.conv1.weight; "
                f"torchvision/timm conv1.weight, layer1.0.conv1.weight); its first keys: {keys or type(obj).__name__}")
    except WeightsFormatError as exc:
        raise CheckpointError(str(exc)) from exc
    logger.info("%s: %s ResNet weights (%s)", path, layout, how)
    return {"format": FORMAT, "arch": arch, "state_dict": state, "normalization": normalization,
            "class_names": [], "config": f"# converted from {layout} file {path} ({how})"}


def load_backbone_weights(model: nn.Module, checkpoint: dict, source: str = "checkpoint", strict_head: bool = False) -> None:
    """Copy a backbone checkpoint's weights into ``model`` with a clear error on any mismatch.

    The classifier (``fc.*``) is skipped when ``model`` has none or a different number of classes,
    unless ``strict_head``. Any other missing, unexpected or differently shaped key is an error that
    names the keys.
    """
    arch = checkpoint.get("arch", {})
    if hasattr(model, "arch"):
        differ = {k: (arch[k], model.arch[k]) for k in model.arch if k in arch and arch[k] != model.arch[k]}
        if differ:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs model {b!r}" for k, (a, b) in differ.items())
            raise CheckpointError(f"{source}: architecture differs from the model ({detail}); set the model's "
                                  "backbone options to match the checkpoint")
    src = checkpoint["state_dict"]
    dst = model.state_dict()
    head_ok = lambda k: strict_head or not k.startswith("fc.")  # noqa: E731
    # a BN's num_batches_tracked is a counter, absent from converted (folded or frozen) weights
    missing = [k for k in dst if k not in src and head_ok(k) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in src if k not in dst and head_ok(k)]
    shapes = [f"{k} {tuple(src[k].shape)} vs {tuple(dst[k].shape)}" for k in dst
              if k in src and src[k].shape != dst[k].shape and head_ok(k)]
    if missing or unexpected or shapes:
        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = [f"missing keys: {few(missing)}" if missing else "",
                 f"unexpected keys: {few(unexpected)}" if unexpected else "",
                 f"shape mismatch: {few(shapes)}" if shapes else ""]
        raise CheckpointError(f"{source}: weights do not fit the model; " + "; ".join(p for p in parts if p))
    to_load = {k: v for k, v in src.items() if k in dst and src[k].shape == dst[k].shape}
    # FrozenBatchNorm2d has no num_batches_tracked; a trained BN checkpoint does: ignore that counter.
    model.load_state_dict(to_load, strict=False)
