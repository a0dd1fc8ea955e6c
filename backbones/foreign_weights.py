"""ResNet weights from elsewhere: the paper's own MSRA models (as Detectron and Detectron2 distribute
them), Detectron2 checkpoints, torchvision and timm state dicts, each recognised by its keys.

Most of these files are pickles of numpy arrays, and a pickle can run any code when it is loaded. They
are read with :func:`safe_unpickle`, which rebuilds only numpy arrays, numbers, strings and plain
containers and refuses everything else (a test feeds it a pickle that would run a shell command).

The MSRA files (``R-50.pkl``, ``R-101.pkl``, ``R-152.pkl``; Caffe2 names such as ``conv1_w``,
``res_conv1_bn_s``, ``res2_0_branch2a_w``, ``res2_0_branch1_w``, ``fc1000_w``) are the networks the
ResNet paper trained. They expect BGR input in 0-255 with only the mean subtracted, their stride sits in
the first 1x1 of a block (``stride_in_1x1``), and their batch norm is already folded into a scale
``_bn_s`` and a bias ``_bn_b``. Loading them here:

* flips the first convolution's input channels, so the network takes RGB like every resdet model;
* sets the normalisation to the MSRA mean (RGB order) and a standard deviation of 1 (0-255 pixels);
* stores the folded BN as weight/bias with mean 0 and variance ``1 - eps``, so ``FrozenBatchNorm2d``
  computes exactly ``x * s + b``.

Detectron2 checkpoints (``backbone.bottom_up.stem.conv1.weight``, ``...res2.0.conv1.norm.weight``; in a
C4 model ``roi_heads.res5.*``) get the same BGR flip and Detectron2's default BGR pixel mean, since its
models are trained on BGR input; torchvision / timm state dicts (``conv1.weight``, ``layer1.0...``) take
RGB with ImageNet's mean and std and have their stride in the 3x3.
"""
from __future__ import annotations

import io
import logging
import pickle
import re
import zipfile
from collections import Counter

import numpy as np
import torch

from .engine.errors import CheckpointError

logger = logging.getLogger(__name__)

# MSRA / Detectron (Caffe2) pixel mean, BGR, 0-255 (Detectron's PIXEL_MEANS)
MSRA_MEAN_BGR = (102.9801, 115.9465, 122.7717)
# Detectron2's default PIXEL_MEAN for its BGR models
DETECTRON2_MEAN_BGR = (103.530, 116.280, 123.675)
BN_EPS = 1e-5  # nn.BatchNorm2d's, which the weights are loaded into first
_LEGACY_TORCH_MAGIC = 0x1950A86A20F9469CFC6C

# What a weights pickle may contain: numpy arrays and scalars, and the builtins pickle needs for them.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "complex"), ("builtins", "bytearray"),
    ("__builtin__", "set"), ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
    ("__builtin__", "object"), ("builtins", "object"),
    ("_codecs", "encode"),  # how a protocol-2 pickle written by Python 3 stores bytes (array buffers)
}


class WeightsFormatError(CheckpointError):
    """A weights file whose layout or content cannot be loaded (named with the file and the keys)."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load {module}.{name}: a weights file holds only arrays, "
                                     "numbers, strings and containers")


def safe_unpickle(path: str):
    """Load a pickle of numpy arrays and plain containers; anything else (code, objects) is refused.
    Python 2 pickles (the MSRA files) are read with latin-1 strings, as numpy needs."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise WeightsFormatError(f"{path}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - truncated or not a pickle at all
        raise WeightsFormatError(f"{path}: not a readable weights pickle ({type(exc).__name__}: {exc})") from exc


def read_weights_file(path: str):
    """A ``torch.save`` file (loaded with ``weights_only=True``) or a pickle (:func:`safe_unpickle`)."""
    if zipfile.is_zipfile(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    obj = safe_unpickle(path)
    if obj == _LEGACY_TORCH_MAGIC:  # torch.save before 1.6 starts with this number; torch reads the rest
        return torch.load(path, map_location="cpu", weights_only=True)
    return obj


def _tensor(value) -> torch.Tensor:
    return value.detach().clone() if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))


def _folded_bn(prefix: str, scale, bias) -> dict:
    s = _tensor(scale).float()
    return {f"{prefix}.weight": s, f"{prefix}.bias": _tensor(bias).float(),
            f"{prefix}.running_mean": torch.zeros_like(s), f"{prefix}.running_var": torch.full_like(s, 1 - BN_EPS)}


def _bgr_to_rgb_conv(weight: torch.Tensor) -> torch.Tensor:
    return weight.flip(1).contiguous()


def _arch(stage_blocks: Counter, base_width: int, num_classes: int, stride_in_1x1: bool) -> dict:
    return dict(block="bottleneck", stage_blocks=[stage_blocks[s] for s in (2, 3, 4, 5)], shortcut="B",
                base_width=base_width, stride_in_1x1=stride_in_1x1, cifar=False, num_classes=num_classes)


_MSRA_BLOCK = re.compile(r"^res(\d)_(\d+)_branch(1|2[abc])_(w|b|bn_s|bn_b)$")
_MSRA_IGNORED = re.compile(r"(_momentum|_riv|_rm)$")


def convert_msra(blobs: dict, source: str) -> tuple[dict, dict, dict]:
    """MSRA Caffe2 blobs -> (state_dict, arch, normalisation). See the module docstring."""
    state: dict[str, torch.Tensor] = {}
    blocks: Counter = Counter()
    unmatched = []
    for key, value in blobs.items():
        if _MSRA_IGNORED.search(key):
            continue
        if key == "conv1_w":
            state["stem.conv.weight"] = _bgr_to_rgb_conv(_tensor(value).float())
        elif key in ("res_conv1_bn_s", "res_conv1_bn_b"):
            continue  # with its partner below
        elif key in ("fc1000_w", "fc1000_b"):
            state["fc.weight" if key.endswith("_w") else "fc.bias"] = _tensor(value).float()
        elif m := _MSRA_BLOCK.match(key):
            stage, index, branch, kind = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
            blocks[stage] = max(blocks[stage], index + 1)
            base = f"res{stage}.{index}."
            layer = {"2a": "1", "2b": "2", "2c": "3"}.get(branch)  # branch1 is the projection shortcut
            conv = base + (f"conv{layer}" if layer else "shortcut.conv")
            norm = base + (f"bn{layer}" if layer else "shortcut.bn")
            if kind == "w":
                state[f"{conv}.weight"] = _tensor(value).float()
            elif kind == "bn_s":
                state.update(_folded_bn(norm, value, blobs[key[:-1] + "b"]))
            elif kind == "b":
                unmatched.append(key)  # a convolution bias: the MSRA ResNets have none
        else:
            unmatched.append(key)
    if "res_conv1_bn_s" in blobs:
        state.update(_folded_bn("stem.bn", blobs["res_conv1_bn_s"], blobs["res_conv1_bn_b"]))
    if unmatched:
        raise WeightsFormatError(f"{source}: MSRA (Caffe2) weights with keys this loader does not know: "
                                 f"{', '.join(sorted(unmatched)[:8])}")
    num_classes = int(state["fc.weight"].shape[0]) if "fc.weight" in state else 0
    arch = _arch(blocks, int(state["stem.conv.weight"].shape[0]), num_classes, stride_in_1x1=True)
    mean = [m / 255.0 for m in reversed(MSRA_MEAN_BGR)]
    return state, arch, {"mean": mean, "std": [1 / 255.0] * 3}


_D2_NAME = re.compile(r"^(?:backbone\.bottom_up\.|backbone\.|roi_heads\.)?(stem|res[2-5])\.(.+)$")


def convert_detectron2(model: dict, source: str) -> tuple[dict, dict, dict]:
    """Detectron2 ResNet names (FPN's ``backbone.bottom_up.*``, C4's ``backbone.*`` + ``roi_heads.res5.*``)
    -> (state_dict, arch, normalisation). Non-backbone keys (heads, FPN) are left out."""
    state: dict[str, torch.Tensor] = {}
    blocks: Counter = Counter()
    for key, value in model.items():
        m = _D2_NAME.match(key)
        if not m or key.startswith(("backbone.fpn", "proposal_generator")):
            continue
        stage, rest = m.group(1), m.group(2)
        if stage == "stem":
            name = rest.replace("conv1.norm.", "bn.").replace("conv1.", "conv.")
            new = f"stem.{name}"
        else:
            index, rest = rest.split(".", 1)
            blocks[int(stage[3])] = max(blocks[int(stage[3])], int(index) + 1)
            for d2, ours in (("shortcut.norm.", "shortcut.bn."), ("shortcut.", "shortcut.conv."),
                             ("conv1.norm.", "bn1."), ("conv2.norm.", "bn2."), ("conv3.norm.", "bn3.")):
                if rest.startswith(d2):
                    rest = ours + rest[len(d2):]
                    break
            new = f"{stage}.{index}.{rest}"
        state[new] = _tensor(value).float()
    if "stem.conv.weight" not in state:
        raise WeightsFormatError(f"{source}: Detectron2 names but no stem (backbone.bottom_up.stem.conv1.weight)")
    state["stem.conv.weight"] = _bgr_to_rgb_conv(state["stem.conv.weight"])
    for key in [k for k in state if k.endswith(".weight") and k.replace(".weight", ".running_var") not in state]:
        prefix = key[: -len(".weight")]
        if prefix.endswith(("bn", "bn1", "bn2", "bn3")) and f"{prefix}.bias" in state:  # FrozenBN saved w/o stats
            state[f"{prefix}.running_mean"] = torch.zeros_like(state[key])
            state[f"{prefix}.running_var"] = torch.full_like(state[key], 1 - BN_EPS)
    arch = _arch(blocks, int(state["stem.conv.weight"].shape[0]), 0, stride_in_1x1=True)
    mean = [m / 255.0 for m in reversed(DETECTRON2_MEAN_BGR)]
    return state, arch, {"mean": mean, "std": [1 / 255.0] * 3}


def detect_layout(obj) -> tuple[str, dict]:
    """(layout, the dict of weights) of a loaded weights object: ``msra``, ``detectron2``, ``torchvision``
    (also timm's ResNets), or ``unknown``."""
    if isinstance(obj, dict) and isinstance(obj.get("blobs"), dict):
        obj = obj["blobs"]  # Detectron's {"blobs": {...}}
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # Detectron2's {"model": {...}, "__author__": ...}
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # timm / Lightning training checkpoints
    if not isinstance(obj, dict):
        return "unknown", {}
    keys = set(obj)
    if {"conv1_w", "res2_0_branch2a_w"} <= keys:
        return "msra", obj
    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
        return "torchvision", obj
    if any(k.endswith("stem.conv1.weight") for k in keys) and any(".res2.0.conv1.weight" in f".{k}" for k in keys):
        return "detectron2", obj
    return "unknown", obj
