"""Training images decoded and augmented on the device (``data.decode=device``).

Why: with the workers' path (``data.py``) each image costs a CPU core a JPEG decode and an OpenCV resize:
2.0 ms for a COCO photo (640x480) on one core of a Xeon (1.5 ms of it decoding), 2.9 ms per worker for
500x375 JPEGs on a 16-core H100 host. A ResNet-50 in bf16 on an H100 takes about 4,000 img/s, so 8-12 free
cores per GPU, common on shared nodes, cannot keep up. Here the workers only read each file's bytes, its
header and the image's random draws (0.17 ms for the same photo); the device decodes the batch (nvJPEG,
through ``torchvision.io.decode_jpeg``) and resizes, crops, flips and colours it there.

The recipe is the workers' one: shorter side drawn in ``scale_range``, a random ``crop_size`` square, a
horizontal flip, AlexNet's PCA lighting, and each image's draws seeded by (seed, epoch, index), so worker
count, ranks and resuming do not change what a sample sees. The pixels are not the workers' pixels: the draws
come from another generator, and the resize is bilinear sampling of the decoded image at the crop's pixel
centres (``roi_align`` with one sample per output pixel), which equals OpenCV's bilinear resize up to its
fixed-point rounding (a test holds it to that) without resizing the parts of the image the crop throws away.

The batch goes to the GPU's JPEG engines (A100, H100: torchvision uses nvJPEG's hardware backend for
baseline JPEGs); any other JPEG torchvision decodes one by one with its Huffman stage on the calling
thread, the training loop's. So a file travels as pixels decoded by OpenCV in the worker unless it is a
baseline colour JPEG: not a JPEG (ImageNet has a few PNGs named ``.JPEG``), progressive, grayscale or
CMYK (22 in ImageNet's train set), or with an EXIF orientation other than upright (OpenCV applies it;
nvJPEG would not). A JPEG the device fails to decode is decoded on the host; one that nothing decodes is
skipped and counted, as in the workers' path.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from ..engine.errors import ConfigError
from ..engine.imageio import decode_image_rgb, read_bytes, read_or_skip
from ..engine.loader import epoch_and_index, item_seed, packed
from ..engine.run import get_logger
from ..imagedata import pca_lighting_offset

EXIF_ORIENTATION = 0x0112


def check_device_decode(data_cfg) -> None:
    """The settings the device path does not offer, named before any image is read."""
    problems = []
    if data_cfg.crop_padding:
        problems.append(f"data.crop_padding={data_cfg.crop_padding} (the CIFAR recipe's zero padding)")
    if data_cfg.scale_range[0] < data_cfg.crop_size:
        problems.append(f"data.scale_range={list(data_cfg.scale_range)} starts below data.crop_size="
                        f"{data_cfg.crop_size} (the crop would need padding)")
    if problems:
        raise ConfigError("data.decode=device does not support " + "; ".join(problems)
                          + ". Use data.decode=workers for these settings.")


def probe_device_decoder(device: torch.device) -> None:
    """Decode one small JPEG on ``device`` now, so that a torchvision built without nvJPEG (or a device it
    cannot use) stops the run before training with the fix, not with every batch failing later."""
    probe = torch.from_numpy(cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))[1].ravel().copy())
    try:
        decode_jpegs([probe], device)
    except RuntimeError as exc:
        raise ConfigError(f"data.decode=device: torchvision cannot decode JPEGs on {device} here ({exc}). "
                          "Use data.decode=workers.") from exc


def resized_crop_box(height: int, width: int, shorter_side: int, crop_size: int, u: float, v: float) -> list[float]:
    """The crop, in the original image's pixel coordinates, of a ``crop_size`` square at relative position
    (``u``, ``v``) in [0, 1) of the image resized to ``shorter_side`` (the longer side rounded down)."""
    if height <= width:
        new_h, new_w = shorter_side, width * shorter_side // height
    else:
        new_h, new_w = height * shorter_side // width, shorter_side
    top, left = int(v * (new_h - crop_size + 1)), int(u * (new_w - crop_size + 1))
    sy, sx = height / new_h, width / new_w
    return [left * sx, top * sy, (left + crop_size) * sx, (top + crop_size) * sy]


@dataclass
class EncodedBatch:
    """A batch as the workers hand it over: each image's JPEG bytes (1-D uint8) or decoded pixels (HxWx3
    uint8), its crop box in its own pixels, flip and colour offset (0-255 scale), and the labels."""
    payloads: list[torch.Tensor]
    boxes: torch.Tensor  # N x 4 (x1, y1, x2, y2)
    flips: torch.Tensor  # N bool
    colour_offsets: torch.Tensor  # N x 3
    labels: torch.Tensor  # N
    paths: list[str]  # for the message when one fails to decode
    skipped: int  # corrupt files the workers dropped

    def pin_memory(self) -> "EncodedBatch":
        self.payloads = [p.pin_memory() for p in self.payloads]
        return self


class EncodedImageFolderDataset(Dataset):
    """ImageFolder samples as (payload, box, flip, colour offset, label, path); ``None`` for an unreadable file."""

    def __init__(self, samples, scale_range, crop_size: int, flip: bool, pca_std: float, seed: int = 0,
                 skip_corrupt: bool = True):
        self.samples = packed(samples)  # shared with the workers, not copied (backbones.engine.loader)
        self.scale_range, self.crop_size = tuple(scale_range), crop_size
        self.flip, self.pca_std, self.seed, self.skip_corrupt = flip, pca_std, seed, skip_corrupt

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index = epoch_and_index(key)
        path, label = self.samples[index]
        read = read_or_skip(lambda: self._payload(read_bytes(path), path), self.skip_corrupt)
        if read is None:
            return None
        payload, height, width = read
        rng = np.random.default_rng(item_seed(self.seed, epoch, index))
        shorter_side = int(rng.integers(self.scale_range[0], self.scale_range[1] + 1))
        u, v = rng.random(2)
        flip = bool(self.flip and rng.random() < 0.5)
        offset = pca_lighting_offset(rng.normal(0.0, self.pca_std, 3)) if self.pca_std > 0 else np.zeros(3, np.float32)
        box = resized_crop_box(height, width, shorter_side, self.crop_size, u, v)
        return payload, box, flip, offset, label, path

    @staticmethod
    def _payload(data: np.ndarray, path) -> tuple[torch.Tensor, int, int]:
        """The JPEG's bytes when the device can take them, else the pixels OpenCV decodes here."""
        try:  # PIL reads the header only: format, size, colour mode, EXIF
            with Image.open(io.BytesIO(data.tobytes())) as header:
                device_ready = (header.format == "JPEG" and header.mode == "RGB" and not header.info.get("progressive")
                                and header.getexif().get(EXIF_ORIENTATION, 1) == 1)
                width, height = header.size
        except Exception:  # not something PIL knows: OpenCV has the last word (and names the file if it fails)
            device_ready = False
        if device_ready:
            return torch.from_numpy(data), height, width
        pixels = decode_image_rgb(data, path)
        return torch.from_numpy(pixels), pixels.shape[0], pixels.shape[1]


def collate_encoded(batch) -> EncodedBatch:
    kept = [b for b in batch if b is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return EncodedBatch([], torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool),
                            torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), [], skipped)
    payloads, boxes, flips, offsets, labels, paths = zip(*kept)
    return EncodedBatch(list(payloads), torch.tensor(boxes, dtype=torch.float32), torch.tensor(flips),
                        torch.from_numpy(np.stack(offsets)), torch.tensor(labels, dtype=torch.long), list(paths),
                        skipped)


def decode_jpegs(payloads: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """3xHxW uint8 RGB images on ``device`` (nvJPEG on a GPU, libjpeg-turbo on the CPU)."""
    with warnings.catch_warnings():
        # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec, which is not a dependency
        # of resdet (nor installed on common GPU images); this is the one call to move when it is.
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(payloads, mode=ImageReadMode.RGB, device=device)


def decode_on_device(payloads: list[torch.Tensor], paths: list[str], device: torch.device,
                     skip_corrupt: bool = True) -> list[torch.Tensor | None]:
    """Every payload as a 3xHxW uint8 image on ``device``; ``None`` where nothing decodes it (or
    CorruptImageError naming the file, without ``skip_corrupt``)."""
    images: list[torch.Tensor | None] = [None] * len(payloads)
    jpegs = [i for i, p in enumerate(payloads) if p.dim() == 1]
    try:
        decoded = decode_jpegs([payloads[i] for i in jpegs], device) if jpegs else []
    except RuntimeError as exc:  # one bad file fails the whole call: find it (rare, so the slow way is fine)
        get_logger().warning("decoding the batch on %s failed (%s); decoding its images one by one", device, exc)
        decoded = []
        for i in jpegs:
            try:
                decoded.append(decode_jpegs([payloads[i]], device)[0])
            except RuntimeError:
                decoded.append(None)
    for i, image in zip(jpegs, decoded):
        if image is None:  # nvJPEG refused it: OpenCV on the host, as the workers' path
            pixels = read_or_skip(lambda: decode_image_rgb(payloads[i].numpy(), paths[i]), skip_corrupt)
            if pixels is None:
                continue
            image = torch.from_numpy(pixels).to(device).permute(2, 0, 1)
        images[i] = image
    for i, p in enumerate(payloads):
        if p.dim() == 3:
            images[i] = p.to(device, non_blocking=True).permute(2, 0, 1)
    return images


def augment_on_device(batch: EncodedBatch, crop_size: int, device: torch.device,
                      skip_corrupt: bool = True) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(uint8 Nx3xcropxcrop images, their labels, images that failed to decode) for an :class:`EncodedBatch`.

    Images of one size share one ``roi_align`` call (ImageNet's photos come in a few sizes), so a batch
    costs a few dozen kernels however many images it has."""
    images = decode_on_device(batch.payloads, batch.paths, device, skip_corrupt)
    ok = [i for i, im in enumerate(images) if im is not None]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i in ok:
        by_size.setdefault(tuple(images[i].shape[1:]), []).append(i)
    out = torch.empty(len(images), 3, crop_size, crop_size, device=device)
    for members in by_size.values():
        stacked = torch.stack([images[i] for i in members]).float()
        rois = torch.cat([torch.arange(len(members), dtype=torch.float32)[:, None], batch.boxes[members]], 1)
        # one bilinear sample at each output pixel's centre (aligned=True: pixel centres at +0.5)
        out[members] = roi_align(stacked, rois.to(device), crop_size, spatial_scale=1.0, sampling_ratio=1,
                                 aligned=True)
    keep = torch.tensor(ok, dtype=torch.long)
    if len(ok) < len(images):
        out = out[keep.to(device)]
    flips = batch.flips[keep].to(device, non_blocking=True)
    offsets = batch.colour_offsets[keep].to(device, non_blocking=True)
    # as the workers' path: resized pixels rounded to uint8, the colour offset added, clipped, truncated
    out = out.round_()
    out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    out = (out + offsets[:, :, None, None]).clamp_(0, 255)
    return out.to(torch.uint8), batch.labels[keep], len(images) - len(ok)
