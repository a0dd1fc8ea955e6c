#!/usr/bin/env python
"""Pretraining speed, side by side in one run: training img/s of our ResNet-50 (paper layout and
torchvision layout) and of torchvision's resnet50 on the same batch and settings, and the img/s of
the data pipelines: ours in one worker (OpenCV decode + albumentations augmentation), torchvision's
(``decode_jpeg`` + ``transforms.v2``) beside it, and data.decode=device's worker and device halves.

    python bench/pretrain_speed.py                                   # CPU, small batch
    python bench/pretrain_speed.py --device cpu --pipeline-only --pipeline-images 200   # the workers alone
    python bench/pretrain_speed.py --device cuda --batch 256 --amp bf16 --channels-last
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

import backbones  # noqa: E402
from backbones.pretraining.data import ImageFolderDataset, train_transform  # noqa: E402
from backbones.pretraining.device_decode import EncodedImageFolderDataset, augment_on_device, collate_encoded  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_speed(model, device, batch, size, iters, warmup, amp_dtype, channels_last) -> float:
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return batch * iters / (time.perf_counter() - start)


def pipeline_speeds(n_images: int, device: torch.device, passes: int = 5) -> list[tuple[str, str]]:
    """Images/s of the input paths on ImageNet-sized JPEGs (500x375, shorter side in [256, 480], 224 crop,
    flip, PCA lighting), each on one core, the median of ``passes`` passes over the images: a worker of
    ``data.decode=workers`` (the training set's item: OpenCV decode, seeded albumentations, a CHW tensor), the
    same with torchvision (``decode_jpeg`` and ``transforms.v2``, which has no PCA lighting), and
    ``data.decode=device``'s two halves, one worker reading the bytes, header and draws, and the device
    decoding and augmenting the images as one batch."""
    rng = np.random.default_rng(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(n_images):
            img = rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)
            img = cv2.GaussianBlur(img, (0, 0), 3)  # photo-like entropy, not pure noise
            paths.append(os.path.join(tmp, f"{i}.jpg"))
            cv2.imwrite(paths[-1], img)
        ours = ImageFolderDataset([(p, 0) for p in paths], ["class"], train_transform([256, 480], 224, True, 0.1))
        theirs = v2.Compose([v2.RandomShortestSize(list(range(256, 481))), v2.RandomCrop(224),
                             v2.RandomHorizontalFlip()])

        def rate(item) -> float:
            times = []
            for epoch in range(passes):
                start = time.perf_counter()
                for i in range(n_images):
                    item(epoch, i)
                times.append(time.perf_counter() - start)
            return n_images / statistics.median(times)

        workers = rate(lambda epoch, i: ours[(epoch, i)])
        read = torchvision.io.read_file
        torchvision_workers = rate(lambda epoch, i: theirs(torchvision.io.decode_jpeg(read(paths[i]))))
        encoded = EncodedImageFolderDataset([(p, 0) for p in paths], [256, 480], 224, True, 0.1)
        reading = rate(lambda epoch, i: encoded[(epoch, i)])
        batch = collate_encoded([encoded[(0, i)] for i in range(n_images)])
        torch.set_num_threads(threads)
        augment_on_device(batch, 224, device)  # warm-up (nvJPEG's handles, the kernels)
        sync(device)
        start = time.perf_counter()
        augment_on_device(batch, 224, device)
        sync(device)
        on_device = n_images / (time.perf_counter() - start)
    return [("data.decode=workers: 1 worker (OpenCV decode, albumentations, 500x375 JPEG)", f"{workers:.1f}"),
            ("torchvision: 1 worker (decode_jpeg, transforms.v2 without PCA lighting)", f"{torchvision_workers:.1f}"),
            ("data.decode=device: 1 worker (read, header, draws)", f"{reading:.1f}"),
            (f"data.decode=device: decode+augment on {device.type} (one batch of {n_images})", f"{on_device:.1f}")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--pipeline-images", type=int, default=128)
    parser.add_argument("--pipeline-only", action="store_true", help="the data pipelines' rows alone")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    rows = []
    models = [("torchvision resnet50", lambda: torchvision.models.resnet50()),
              ("resdet resnet50 (stride in 3x3, = torchvision)", lambda: backbones.resnet50(stride_in_1x1=False)),
              ("resdet resnet50 (stride in 1x1, paper)", lambda: backbones.resnet50())]
    for name, make in [] if args.pipeline_only else models:
        torch.manual_seed(0)
        speed = train_speed(make(), device, args.batch, args.size, args.iters, args.warmup, amp, args.channels_last)
        rows.append((name, f"{speed:.1f}"))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows += pipeline_speeds(args.pipeline_images, device)
    print(f"\ndevice {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
          f"batch {args.batch}, {args.size}px, amp {args.amp}, channels_last {args.channels_last}, "
          f"torch {torch.__version__}")
    width = max(len(r[0]) for r in rows)
    print(f"| {'what'.ljust(width)} | img/s |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
