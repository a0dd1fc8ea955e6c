"""Classification evaluation: centre crop, 10-crop and the paper's fully-convolutional multi-scale
testing (section 3.4: the fc layer applied at every position of the last feature map, which, since
it follows global average pooling, equals pooling then fc; softmax scores averaged over scales).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..engine.dist import get_rank, get_world_size, reduce_sum
from ..engine.loader import worker_loader
from ..engine.preemption import ignore_stop_signals, interruptible
from ..imagedata import ShardedSampler, normalize  # noqa: F401 (normalize: re-exported)
from .data import ImageFolderDataset, center_crop_transform, collate_skip_none, resize_transform


def _topk_correct(probs: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    top5 = probs.topk(min(5, probs.shape[1]), dim=1).indices
    hit = top5 == labels[:, None]
    return int(hit[:, 0].sum()), int(hit.any(1).sum())


def _loader(dataset, batch_size, workers):
    sampler = ShardedSampler(len(dataset), shuffle=False, rank=get_rank(), world_size=get_world_size(), pad=False)
    return worker_loader(dataset, workers, batch_size=batch_size, sampler=sampler, collate_fn=collate_skip_none,
                         worker_init_fn=ignore_stop_signals)


@torch.no_grad()
def evaluate_classifier(model, samples, classes, mode: str, device, mean, std, *, resize=256, crop=224,
                        scales=(224, 256, 384, 480, 640), batch_size=64, workers=2, amp_dtype=None,
                        channels_last=False) -> dict:
    """Top-1/top-5 accuracy and error over ``samples``, reduced over ranks.

    ``mode``: ``center`` (resize shorter side to ``resize``, centre ``crop``), ``ten_crop``, or
    ``multiscale`` (whole image at each shorter side in ``scales``, batch of one per image).
    """
    model.eval()
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    correct1 = correct5 = count = skipped = 0

    def run(x):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return F.softmax(model(normalize(x, mean_t, std_t, channels_last)).float(), dim=1)

    if mode in ("center", "ten_crop"):
        ten = crop if mode == "ten_crop" else 0
        transform = resize_transform(resize) if ten else center_crop_transform(resize, crop)
        ds = ImageFolderDataset(samples, classes, transform, ten_crop=ten)
        loader = _loader(ds, batch_size if not ten else max(1, batch_size // 10), workers)
        for images, labels, n_skipped in interruptible(loader):  # a stop signal in training ends it
            skipped += n_skipped
            if images is None:
                continue
            images, labels = images.to(device, non_blocking=True), labels.to(device)
            if ten:  # B x 10 x C x H x W: average the softmax over the ten crops
                b = images.shape[0]
                probs = run(images.flatten(0, 1)).view(b, 10, -1).mean(1)
            else:
                probs = run(images)
            c1, c5 = _topk_correct(probs, labels)
            correct1, correct5, count = correct1 + c1, correct5 + c5, count + labels.numel()
    elif mode == "multiscale":
        per_scale = [ImageFolderDataset(samples, classes, resize_transform(s)) for s in scales]
        loaders = [_loader(ds, 1, workers) for ds in per_scale]
        for items in interruptible(zip(*loaders), len(loaders[0])):
            if any(images is None for images, _, _ in items):
                skipped += 1
                continue
            probs = torch.stack([run(images.to(device)) for images, _, _ in items]).mean(0)
            labels = items[0][1].to(device)
            c1, c5 = _topk_correct(probs, labels)
            correct1, correct5, count = correct1 + c1, correct5 + c5, count + labels.numel()
    else:
        raise ValueError(f"mode must be center, ten_crop or multiscale, got {mode!r}")
    totals = reduce_sum({"c1": correct1, "c5": correct5, "n": count, "skipped": skipped}, device)
    n = max(totals["n"], 1)
    return {
        "top1": totals["c1"] / n, "top5": totals["c5"] / n,
        "top1_err": 1 - totals["c1"] / n, "top5_err": 1 - totals["c5"] / n,
        "images": int(totals["n"]), "skipped_corrupt": int(totals["skipped"]),
    }
