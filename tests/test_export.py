"""The deployable detector (detection/export.py): one graph from image to boxes, any image size.

The trained-detector checks (ONNX with onnxruntime and the torch.export program against PyTorch on real
images, and the exported model's AP) are in test_det_train.py beside the training they need."""
import pytest
import torch

from detection.export import DeployableDetector, export_program
from detection.modeling import build_detector
from det_helpers import slim_cfg


def deployable(neck: str, **roi_heads) -> DeployableDetector:
    torch.manual_seed(0)
    cfg = slim_cfg(neck)
    for key, value in roi_heads.items():
        cfg.roi_heads[key] = value
    return DeployableDetector(build_detector(cfg, num_classes=3).eval(), min_size=128, max_size=200,
                              size_divisibility=32)


def image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("neck", ["none", "fpn"])
def test_exported_program_takes_any_image_size_and_matches_the_module(neck):
    """Exported at one size, run at others (portrait, landscape, an extreme 1:8 strip that is padded to two
    cells of the coarsest level): the same detections as the eager module, in the input image's pixels."""
    model = deployable(neck)
    program = export_program(model, image(120, 160)).module()
    for height, width in [(120, 160), (181, 97), (40, 320), (300, 300)]:
        x = image(height, width, seed=height)
        with torch.no_grad():
            expected, got = model(x), program(x)
        assert len(expected[0]) > 0
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-5)
        boxes = got[0]
        assert (boxes[:, 0::2] <= width).all() and (boxes[:, 1::2] <= height).all() and (boxes >= 0).all()


def test_exported_program_returns_no_detections_without_failing():
    """An image with nothing above the score threshold gives (0, 4) boxes, not a failed runtime check
    (torchvision's fake NMS kernel claims at least two kept boxes; detection/export.py corrects that)."""
    model = deployable("none", score_thresh=1.0)
    program = export_program(model, image(120, 160)).module()
    boxes, scores, labels = program(image(150, 110, seed=5))
    assert boxes.shape == (0, 4) and scores.shape == (0,) and labels.shape == (0,)

