#!/usr/bin/env python
"""The FPN pooler's memory on the CPU: the most bytes its forward and its backward hold at once, for the GPU's
path (every level pools every RoI, the other levels' shrunk to a point: no host synchronisation) beside the
CPU's (each level pools its own RoIs). Read from glibc's allocator after every operator (``mallinfo2``; each
output here is large enough to be mapped on its own, so a freed one is given back at once). The GPU's
caching allocator holds the same tensors; it is not measured here. Linux with glibc only.

    python bench/pooler_memory.py                  # 2 images x 1024 RoIs, 256 channels, 800x1216 input
    python bench/pooler_memory.py --rois 512 --images 8
"""
import argparse
import ctypes
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from detection.modeling import poolers  # noqa: E402


class MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallinfo2.restype = MallInfo


def allocated() -> int:
    info = LIBC.mallinfo2()
    return info.hblkhd + info.uordblks  # mapped blocks + the heap's blocks in use


class PeakAfterEachOp(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.peak = allocated()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, allocated())
        return out


def measure(pooler_type: str, gpu_path: bool, images: int, rois: int, channels: int) -> tuple[float, float, float]:
    poolers.sizes_follow_data = lambda device: not gpu_path
    g = torch.Generator().manual_seed(0)
    features = [torch.randn(images, channels, 200 // 2**i, 304 // 2**i, generator=g, requires_grad=True)
                for i in range(4)]
    centres = torch.rand(images * rois, 2, generator=g) * torch.tensor([1216.0, 800.0])
    sides = torch.rand(images * rois, 2, generator=g) * 400 + 8
    boxes = torch.cat([centres - sides / 2, centres + sides / 2], 1).clamp(min=0).split(rois)
    pooler = poolers.ROIPooler(7, [1 / 4, 1 / 8, 1 / 16, 1 / 32], 0, pooler_type, kernel="torchvision")
    base = allocated()
    with PeakAfterEachOp() as forward:
        out = pooler(features, boxes)
    with PeakAfterEachOp() as backward:
        out.sum().backward()
    mib = 2**20
    return out.numel() * out.element_size() / mib, (forward.peak - base) / mib, (backward.peak - base) / mib


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--rois", type=int, default=1024, help="per image")
    parser.add_argument("--channels", type=int, default=256)
    args = parser.parse_args()
    print(f"{args.images} images x {args.rois} RoIs, {args.channels} channels, 4 levels, 7x7, float32; MiB above "
          "the inputs")
    print("| pooler | path | one output | forward peak | backward peak |\n|---|---|---|---|---|")
    for pooler_type in ("ROIAlignV2", "ROIAlign", "ROIPool"):
        for gpu_path in (False, True):
            one, forward, backward = measure(pooler_type, gpu_path, args.images, args.rois, args.channels)
            path = "every level pools every RoI (GPU)" if gpu_path else "each level its own RoIs (CPU)"
            print(f"| {pooler_type} | {path} | {one:.0f} | {forward:.0f} | {backward:.0f} |")


if __name__ == "__main__":
    main()
