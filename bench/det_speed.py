#!/usr/bin/env python
"""Detection speed, side by side in one run, same inputs and settings:

* our R50-C4 / R101-C4 against the same C4 design assembled from torchvision parts
  (``FasterRCNN`` with a res4 trunk, 14x14 RoIAlign and res5 as the box head);
* our R50-FPN against torchvision's ``fasterrcnn_resnet50_fpn``.

resdet appears several times: the plain path (frozen BN as separate layers, NCHW), the fast path (the
defaults: frozen BN folded into the convolutions, and channels-last), all in torchvision's layout (stride in
the 3x3) so that both sides do the same arithmetic; ``paper`` is the fast path in the paper's layout, the
configs' default (stride in the 1x1: res5 reads a quarter of the 14x14 RoI bins, and only those are pooled;
C4 only); ``triton`` the fast path with RoIAlign as Triton kernels on channels-last features in their own
dtype (``model.roi_heads.pooler_kernel=triton``, CUDA) and NMS as Triton kernels without a host
synchronisation (``model.nms_kernel=triton``), ``paper-triton`` both; ``graph`` that, with its inference
replayed as one CUDA graph (``eval.cuda_graphs``: ``GraphedDetector``; training as ``triton``); with
``--variants compile``, the fast path with its trunk, neck, RPN convolutions and box head compiled (inductor),
or with ``compile-ro`` compiled in ``mode="reduce-overhead"`` (CUDA graphs of those parts). Training img/s,
inference ms/img, peak GPU memory, and what one training step and one inference cost the host: on CUDA the
synchronisations (blocking CUDA runtime calls) and kernel launches the profiler counts, on the CPU the
operators dispatched (views left out; on a GPU about one launch each).

    python bench/det_speed.py                                     # CPU: small images, few steps
    python bench/det_speed.py --device cuda --batch 8 --height 800 --width 1216 --amp bf16 --iters 20 --variants plain,fast,compile,torchvision
"""
import argparse
import functools
import os
import sys
import time
import weakref

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torchvision  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor  # noqa: E402
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign  # noqa: E402

from detection.config import DetConfig  # noqa: E402
from detection.modeling.config import Neck, NMSKernel, RoIAlignKernel  # noqa: E402
from detection.modeling.build import build_detector  # noqa: E402
from detection.modeling.graphed import GraphedDetector  # noqa: E402

NUM_CLASSES = 80


def make_inputs(batch, height, width, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, 3, height, width), generator=g, dtype=torch.uint8)
    targets = []
    for _ in range(batch):
        n = 8
        xy = torch.rand(n, 2, generator=g) * torch.tensor([width * 0.7, height * 0.7])
        wh = 32 + torch.rand(n, 2, generator=g) * torch.tensor([width * 0.3, height * 0.3])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1).to(device),
                        "labels": torch.randint(1, NUM_CLASSES + 1, (n,), generator=g).to(device),
                        "crowd_boxes": torch.zeros(0, 4, device=device)})
    return images.to(device), targets


def ours(depth, neck, fast=True, compile=None, paper_layout=False, pooler_kernel="auto", base_width=64,
         nms_kernel="auto"):
    """resdet's detector: ``fast`` the defaults (frozen BN folded) in channels-last, else the plain layers in
    NCHW; ``compile``: its dense parts compiled in this mode of ``torch.compile``; ``paper_layout``: the
    stride in the first 1x1 of a block (the configs' default), else in the 3x3 as torchvision's;
    ``pooler_kernel``: RoIAlign's (``model.roi_heads.pooler_kernel``); ``base_width``: the trunk's
    channels (64 is ResNet's; narrower only where the work does not matter, as in ``host_ops.py``);
    ``nms_kernel``: the RPN's and post-processing's NMS (``model.nms_kernel``)."""
    cfg = OmegaConf.structured(DetConfig)
    cfg.model.backbone.depth = depth
    cfg.model.backbone.base_width = base_width
    cfg.model.backbone.fold_frozen_bn = fast
    cfg.model.backbone.stride_in_1x1 = paper_layout
    cfg.model.roi_heads.pooler_kernel = RoIAlignKernel(pooler_kernel)
    cfg.model.nms_kernel = NMSKernel(nms_kernel)
    cfg.model.neck = Neck(neck)
    if neck == "fpn":
        cfg.model.roi_heads.pooler_resolution = 7
        cfg.model.rpn.pre_nms_topk_train, cfg.model.rpn.post_nms_topk_train = 2000, 1000
        cfg.model.rpn.pre_nms_topk_test, cfg.model.rpn.post_nms_topk_test = 1000, 1000
    model = build_detector(cfg.model, num_classes=NUM_CLASSES)
    if fast:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile_parts(mode=compile)
    return model


def torchvision_c4(depth, height, width):
    """The paper's C4 design from torchvision parts, with our defaults (proposals, RoIs, sizes)."""
    resnet = getattr(torchvision.models, f"resnet{depth}")(norm_layer=FrozenBatchNorm2d)
    trunk = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1, resnet.layer2,
                          resnet.layer3)
    for module in (resnet.conv1, resnet.layer1):  # freeze_at=2, as ours
        for p in module.parameters():
            p.requires_grad_(False)
    trunk.out_channels = 1024
    box_head = nn.Sequential(resnet.layer4, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return FasterRCNN(
        trunk, num_classes=None, min_size=height, max_size=max(height, width),
        rpn_anchor_generator=AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 14, 0), box_head=box_head,
        box_predictor=FastRCNNPredictor(2048, NUM_CLASSES + 1),
        rpn_pre_nms_top_n_train=12000, rpn_post_nms_top_n_train=2000,
        rpn_pre_nms_top_n_test=6000, rpn_post_nms_top_n_test=1000, box_batch_size_per_image=512,
    )


def torchvision_fpn(height, width):
    return fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1,
                                   min_size=height, max_size=max(height, width))


def calm_residual_branches(model):
    """Zero the last (frozen) BN scale of every residual block, on both sides alike.

    Random convolutions behind frozen, identity BN grow activations with depth until the RPN finds
    no finite proposal (R101 reaches ~1e5); with every branch starting at zero the features stay
    sane, the same proposals flow, and the work timed is unchanged.
    """
    for m in model.modules():
        last = getattr(m, "bn3", None) if hasattr(m, "conv3") else None
        if isinstance(last, FrozenBatchNorm2d):
            last.weight.zero_()
    return model


def run_ours(model, images, targets, train):
    batch = {"images": images, "image_sizes": [tuple(images.shape[-2:])] * len(images), "targets": targets}
    out = model(batch)
    return sum(out.values()) if train else out


GRAPHED: "weakref.WeakKeyDictionary[torch.nn.Module, GraphedDetector]" = weakref.WeakKeyDictionary()


def run_graphed(model, images, targets, train):
    """``run_ours``, inference through a ``GraphedDetector`` of the model (one per model: its graphs)."""
    if train:
        return run_ours(model, images, targets, train)
    if model not in GRAPHED:
        GRAPHED[model] = GraphedDetector(model, strict=True)
    graphed = GRAPHED[model]
    return graphed({"images": images, "image_sizes": [tuple(images.shape[-2:])] * len(images)})


def run_tv(model, images, targets, train):
    floats = [im.float() / 255.0 for im in images]
    if train:
        return sum(model(floats, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]).values())
    return model(floats)


SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx", "cudaGraphLaunch")
VIEW_OPS = {"view", "_unsafe_view", "_reshape_alias", "reshape", "unsqueeze", "squeeze", "permute", "transpose",
            "t", "expand", "select", "slice", "as_strided", "alias", "unbind", "split", "split_with_sizes", "chunk",
            "detach", "narrow", "unfold", "lift_fresh"}


class OpCounter(TorchDispatchMode):
    """Operators dispatched to a kernel, in order (``names``), views left out (they launch nothing)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    @property
    def count(self) -> int:
        return len(self.names)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in VIEW_OPS:
            self.names.append(name)
        return func(*args, **(kwargs or {}))


def report_failure(what: str, exc: Exception) -> None:
    """One line for a variant that fails part of the bench (compile-ro may not train); the row goes on."""
    print(f"{what} failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}")


def count_host_calls(device, fn, compiled: bool = False) -> tuple[int | str, int | str]:
    """What ``fn`` costs the host: on CUDA its synchronisations (the runtime calls that block the host, as
    the profiler records them: a copy to the host through pageable memory is a memcpy plus a stream
    synchronisation) and its kernel launches (a CUDA graph's replay counts once); on the CPU no
    synchronisations and the operators it dispatches (not for a ``compiled`` model: the counting mode would
    send its compiled parts back to eager)."""
    if device.type != "cuda":
        if compiled:
            return "n/a", "n/a"
        with OpCounter() as counter:
            fn()
        return "n/a", counter.count
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        torch.cuda.synchronize()
    # the last event is the synchronize above, which is the measurement's, not fn's
    events = prof.events()
    return (max(0, sum(e.name in SYNC_CALLS for e in events) - 1), sum(e.name in LAUNCH_CALLS for e in events))


def train_step_of(model, runner, images, targets, device, amp):
    """``model`` on ``device`` in training mode, and one SGD step of it on the inputs as a function."""
    model.to(device).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def train_step():
        torch.compiler.cudagraph_mark_step_begin()  # a new iteration for CUDA graphs (compile-ro); else a no-op
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            loss = runner(model, images, targets, True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return train_step


def host_calls(model, runner, images, targets, device, amp, compiled: bool = False) -> tuple[str, str]:
    """Host synchronisations and kernel launches (CPU: operators) of one training step and one inference,
    as ``"train / inference"``, after one of each to warm up. Run after every timing: the profiler leaves the
    host slower once it has run (on an H100 it doubled a later bs-1 inference)."""
    try:
        train_step = train_step_of(model, runner, images, targets, device, amp)
        train_step()
        train = count_host_calls(device, train_step, compiled)
    except Exception as exc:  # noqa: BLE001 - the row says so and the inference column still comes
        report_failure("training", exc)
        train = ("failed", "failed")
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        runner(model, images[:1], None, False)
        infer = count_host_calls(device, lambda: runner(model, images[:1], None, False), compiled)
    model.to("cpu")
    return f"{train[0]} / {infer[0]}", f"{train[1]} / {infer[1]}"


def measure(model, runner, images, targets, device, amp, iters, warmup):
    """Training img/s, inference ms/img (batch 1) and peak GPU memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_step = train_step_of(model, runner, images, targets, device, amp)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    try:
        for _ in range(warmup):
            train_step()
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            train_step()
        sync()
        train_ips = len(images) * iters / (time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - a variant that cannot train (compile-ro) still gets its inference
        report_failure("training", exc)
        train_ips = float("nan")
    model.eval()
    one = images[:1]
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        for _ in range(warmup):
            runner(model, one, None, False)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            runner(model, one, None, False)
        sync()
    infer_ms = 1000 * (time.perf_counter() - t0) / iters
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    model.to("cpu")
    return train_ips, infer_ms, peak


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--height", type=int, default=320)
    parser.add_argument("--width", type=int, default=480)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--models", default="r50c4,r101c4,r50fpn")
    parser.add_argument("--variants", default="plain,fast,paper,torchvision",
                        help="of plain, fast, paper (fast in the paper's layout, C4 only), triton (fast with "
                             "Triton's RoIAlign and NMS, CUDA), paper-triton (both), graph (triton, inference as a "
                             "CUDA graph), compile (fast + compiled parts, "
                             "inductor), compile-ro (the same in mode reduce-overhead: CUDA graphs), torchvision")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    images, targets = make_inputs(args.batch, args.height, args.width, device)
    pairs = {}
    for key, (depth, neck, label) in {"r50c4": (50, "none", "R50-C4"), "r101c4": (101, "none", "R101-C4"),
                                      "r50fpn": (50, "fpn", "R50-FPN")}.items():
        variants = {
            "plain": (f"resdet {label}, plain", functools.partial(ours, depth, neck, False), run_ours),
            "fast": (f"resdet {label}, fast (default)", functools.partial(ours, depth, neck, True), run_ours),
            "paper": (f"resdet {label}, fast, paper's layout",
                      functools.partial(ours, depth, neck, paper_layout=True), run_ours),
            "triton": (f"resdet {label}, fast, Triton RoIAlign + NMS",
                       functools.partial(ours, depth, neck, pooler_kernel="triton", nms_kernel="triton"), run_ours),
            "paper-triton": (f"resdet {label}, fast, paper's layout, Triton RoIAlign + NMS",
                             functools.partial(ours, depth, neck, paper_layout=True, pooler_kernel="triton",
                                               nms_kernel="triton"), run_ours),
            "graph": (f"resdet {label}, fast, Triton RoIAlign + NMS, inference as a CUDA graph",
                      functools.partial(ours, depth, neck, pooler_kernel="triton", nms_kernel="triton"), run_graphed),
            "compile": (f"resdet {label}, fast + compile", functools.partial(ours, depth, neck, True, "default"),
                        run_ours),
            "compile-ro": (f"resdet {label}, fast + compile reduce-overhead",
                           functools.partial(ours, depth, neck, True, "reduce-overhead"), run_ours),
            "torchvision": ("torchvision fasterrcnn_resnet50_fpn", functools.partial(torchvision_fpn, args.height,
                                                                                   args.width), run_tv)
            if neck == "fpn" else
            (f"torchvision parts {label}", functools.partial(torchvision_c4, depth, args.height, args.width), run_tv)}
        pairs[key] = [(*variants[v], v.startswith("compile")) for v in args.variants.split(",")
                      if not (v.startswith("paper") and neck == "fpn")]  # the FPN head reads every bin
    rows = []
    for key in args.models.split(","):
        for name, make, runner, _ in pairs[key]:
            torch.manual_seed(0)
            row = (name, *measure(calm_residual_branches(make()), runner, images, targets, device, amp, args.iters,
                                  args.warmup))
            rows.append(row)
            print("{}: {:.2f} img/s train, {:.1f} ms/img inference, peak {:.1f} GiB".format(*row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    calls = []  # after every timing: see host_calls()
    for key in args.models.split(","):
        for _, make, runner, compiled in pairs[key]:
            torch.manual_seed(0)
            calls.append(host_calls(calm_residual_branches(make()), runner, images, targets, device, amp, compiled))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"\ndevice {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), batch {args.batch}, "
          f"{args.height}x{args.width}, amp {args.amp}, torch {torch.__version__}, 80 classes, 8 boxes/image")
    launches = "kernel launches" if device.type == "cuda" else "operators dispatched"
    print(f"| model | train img/s | inference ms/img | peak GPU mem (GiB) | host syncs: train step / inference "
          f"| {launches}: train step / inference |\n|---|---|---|---|---|---|")
    for (name, ips, ms, peak), (syncs, counts) in zip(rows, calls):
        print(f"| {name} | {ips:.2f} | {ms:.1f} | {peak:.1f} | {syncs} | {counts} |")

if __name__ == "__main__":
    main()
