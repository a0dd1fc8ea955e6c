"""The whole Faster R-CNN (detection/modeling/build.py): both necks train and infer, the C4 detector equals
torchvision's FasterRCNN with the same weights, backbone weights load (and mismatches fail clearly), and a
tiny C4 detector overfits four synthetic images."""
import time

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchvision.ops import FrozenBatchNorm2d, box_iou

from backbones import CheckpointError, backbone_checkpoint, build_resnet, convert_bn_to_frozen
from detection.modeling import (
    DetectorConfig,
    build_detector,
)
from detection.modeling.build import unnormalised_backbone
from backbones.options import Norm
from detection.modeling.config import PoolerType
from detection.modeling.test_time import TestTimeDetector, TestTimeOptions
from det_helpers import slim_cfg, two_image_batch


# -- the whole detector ------------------------------------------------------------------------------


@pytest.mark.parametrize("neck", ["none", "fpn"])
def test_build_detector_train_and_eval(neck):
    torch.manual_seed(0)
    model = build_detector(slim_cfg(neck), num_classes=3)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # frozen_bn by default
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert not any(p.requires_grad for p in model.trunk.stem.parameters())
    assert not any(p.requires_grad for p in model.trunk.res2.parameters())
    assert all(p.requires_grad for p in model.trunk.res3.parameters())
    batch = two_image_batch()
    model.train()
    losses = model(batch)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)  # every trainable weight is used (DDP without unused params)
    model.eval()
    with torch.no_grad():
        detections = model(batch)
    assert len(detections) == 2
    for det, (h, w) in zip(detections, batch["image_sizes"]):
        assert det["boxes"].shape[1] == 4 and len(det["boxes"]) == len(det["scores"]) == len(det["labels"]) <= 100
        if len(det["boxes"]):
            assert det["boxes"][:, 2].max() <= w and det["boxes"][:, 3].max() <= h
            assert det["labels"].min() >= 1 and det["labels"].max() <= 3
    # channels_last gives the same detections
    model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        again = model(batch)
    torch.testing.assert_close(again[0]["scores"], detections[0]["scores"], atol=1e-4, rtol=1e-4)


def test_detector_returns_boxes_in_the_original_image_when_the_batch_carries_its_frame():
    """Evaluation ends in the original image's pixels when a target carries its frame (the data pipeline's
    orig_size, scale, flipped): mirrored back within the resized width, divided by the scale per axis,
    clipped; the test-time detector the same; a batch without frames stays in the network input's pixels."""
    torch.manual_seed(0)
    model = build_detector(slim_cfg("none"), num_classes=3).eval()
    with torch.no_grad():  # heads away from their near-zero initialisation: boxes everywhere
        model.roi_heads.box_predictor.bbox_pred.weight.normal_(0, 0.05)
    batch = two_image_batch()
    del batch["targets"]
    with torch.no_grad():
        network = model(batch)
    assert len(network[0]["boxes"]) > 5
    # image 0: 96x128 resized from 192x512 (sy 0.5, sx 0.25) and mirrored; image 1 resized from 40x50
    frames = [{"orig_size": (192, 512), "scale": (0.5, 0.25), "flipped": True},
              {"orig_size": (40, 50), "scale": (2.0, 2.0), "flipped": False}]
    with torch.no_grad():
        mapped = model({**batch, "targets": frames})
        tested = TestTimeDetector([model], TestTimeOptions(), base_size=96)({**batch, "targets": frames})
    x1, y1, x2, y2 = network[0]["boxes"].unbind(1)
    expected = torch.stack([(128 - x2) * 4, y1 * 2, (128 - x1) * 4, y2 * 2], 1).clamp(min=0)
    expected[:, 0::2] = expected[:, 0::2].clamp(max=512)
    expected[:, 1::2] = expected[:, 1::2].clamp(max=192)
    torch.testing.assert_close(mapped[0]["boxes"], expected)
    torch.testing.assert_close(mapped[1]["boxes"], (network[1]["boxes"] / 2).minimum(torch.tensor([50.0, 40, 50, 40])))
    for m, n, t in zip(mapped, network, tested):
        assert torch.equal(m["scores"], n["scores"]) and torch.equal(m["labels"], n["labels"])
        assert torch.equal(t["boxes"], m["boxes"]) and torch.equal(t["scores"], m["scores"])


@pytest.mark.parametrize("neck", ["none", "fpn"])
def test_fast_path_matches_the_plain_path_and_shares_its_checkpoints(neck):
    """Folded frozen BN + channels-last + compiled dense parts (issue 9's fast path) against the plain layers,
    same weights, float32: the same losses and detections. The checkpoint of one loads into the other.
    The compile backend here is aot_eager (graph capture and autograd without a C++ compiler); a GPU
    uses inductor (bench/det_speed.py)."""
    torch.manual_seed(0)
    plain = build_detector(slim_cfg(neck, fold_frozen_bn=False), num_classes=3)
    with torch.no_grad():  # statistics far from identity, so folding has something to get wrong
        for m in plain.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2.0)
    fast = build_detector(slim_cfg(neck, fold_frozen_bn=True), num_classes=3)
    fast.load_state_dict(plain.state_dict())
    fast.to(memory_format=torch.channels_last)
    parts = ["trunk", "neck", "RPN head", "box head"] if neck == "fpn" else ["trunk", "RPN head", "box head"]
    assert fast.compile_parts(backend="aot_eager") == parts
    batch = two_image_batch()
    losses = []
    for model in (plain, fast):
        model.train()
        model.set_sampling_generator(torch.Generator().manual_seed(5))
        losses.append(model(batch))
    for k in losses[0]:
        torch.testing.assert_close(losses[1][k], losses[0][k], rtol=1e-4, atol=1e-5, msg=k)
    with torch.no_grad():
        detections = [model.eval()(batch) for model in (plain, fast)]
    assert sum(len(d["boxes"]) for d in detections[0]) > 0
    for a, b in zip(*detections):
        assert torch.equal(a["labels"], b["labels"])
        torch.testing.assert_close(b["boxes"], a["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(b["scores"], a["scores"], rtol=1e-4, atol=1e-5)
    assert list(fast.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(fast.state_dict())


@pytest.mark.parametrize("stride_in_1x1", [True, False])
@pytest.mark.parametrize("kernel", ["separable", "torchvision"])
def test_c4_head_pools_only_the_bins_res5_reads(stride_in_1x1, kernel, monkeypatch):
    """With the paper's stride in res5's first 1x1, the C4 head pools only the 7x7 bins that block reads and
    runs it with unit stride: the box features and every gradient equal 14x14 RoIAlign (torchvision's op)
    through an untouched res5 with the same weights, with either of the pooler's kernels (float64, so that a
    difference is the method's, not float32 sums in another order). In torchvision's layout (stride in the
    3x3) every bin is read and pooled."""
    from detection.modeling import poolers
    from torchvision.ops import roi_align
    monkeypatch.setattr(poolers, "separable_roi_align_is_cheaper", lambda *args: kernel == "separable")
    torch.manual_seed(0)
    model = build_detector(slim_cfg(depth=50, stride_in_1x1=stride_in_1x1), num_classes=3)
    head = model.roi_heads
    assert head.bin_step == (2 if stride_in_1x1 else 1)
    reference = build_resnet(50, num_classes=0, base_width=8, stride_in_1x1=stride_in_1x1).res5
    convert_bn_to_frozen(reference)
    reference.load_state_dict(head.res5.state_dict())
    head.double(), reference.double()
    with torch.no_grad():  # statistics away from identity, in both
        for res5 in (head.res5, reference):
            g = torch.Generator().manual_seed(2)
            for m in res5.modules():
                if isinstance(m, FrozenBatchNorm2d):
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    g = torch.Generator().manual_seed(1)
    features = torch.randn(2, 128, 6, 8, generator=g, dtype=torch.float64)  # res4 of two 96x128 images
    corner = torch.rand(2, 20, 2, generator=g, dtype=torch.float64) * 140 - 20  # some reach outside, some span it
    proposals = torch.cat([corner, corner + torch.rand(2, 20, 2, generator=g, dtype=torch.float64) * 150 + 1], 2)
    proposals = list(proposals.float().double())  # the head's RoIs are float32 boxes
    ours_in, ref_in = features.clone().requires_grad_(), features.clone().requires_grad_()
    ours = head.box_features({"res4": ours_in}, proposals)
    rois = torch.cat([torch.cat([torch.full((20, 1), float(i), dtype=torch.float64), p], 1)
                      for i, p in enumerate(proposals)])
    ref = reference(roi_align(ref_in, rois, (14, 14), 1 / 16, 0, aligned=True)).mean(dim=(2, 3))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    weights = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (ours * weights).sum().backward(), (ref * weights).sum().backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=0, atol=1e-12)
    for (name, a), b in zip(head.res5.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("option", ["eval.flip=true", "eval.test_scales=[400,600]", "eval.box_refinement=true"])
def test_cuda_graph_compile_mode_refuses_the_test_time_options_before_loading(option, tmp_path):
    """eval.compile_mode=reduce_overhead (CUDA graphs reuse their outputs) cannot serve the test-time options,
    which keep several views' features: a clear error before any weights are read, and without the option
    the load goes on (here to the missing checkpoint)."""
    from backbones.engine.errors import ConfigError
    from detection.config import DetConfig
    from detection.predictor import load_trained_detector

    cfg = OmegaConf.structured(DetConfig)
    OmegaConf.update(cfg, "eval.compile_mode", "reduce_overhead")
    tested = OmegaConf.merge(cfg, OmegaConf.from_dotlist([option]))
    with pytest.raises(ConfigError, match=r"eval.compile_mode=reduce_overhead .*eval.flip"):
        load_trained_detector(str(tmp_path), tested, "last", "cpu", compile=True)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_trained_detector(str(tmp_path), cfg, "last", "cpu", compile=True)
    with pytest.raises(CheckpointError, match="checkpoint not found"):  # not compiled: the options are fine
        load_trained_detector(str(tmp_path), tested, "last", "cpu", compile=False)


def test_cuda_graphs_name_every_unmet_requirement_before_loading(tmp_path):
    """eval.cuda_graphs records the whole inference: it needs the NMS without host waits (model.nms_kernel=auto
    takes it; torchvision is refused), and cannot serve the test-time options or compile_mode=reduce_overhead's
    own graphs. Every problem in one error before any weight is read; met, the load goes on (here to the missing
    checkpoint). The graph wrapper refuses a model without that NMS too, and for_testing an ensemble or a
    test-time option."""
    from backbones.engine.errors import ConfigError
    from detection.config import DetConfig
    from detection.modeling.graphed import GraphedDetector
    from detection.modeling.test_time import for_testing
    from detection.predictor import load_trained_detector

    cfg = OmegaConf.structured(DetConfig)
    OmegaConf.update(cfg, "eval.cuda_graphs", True)
    wrong = OmegaConf.merge(cfg, OmegaConf.from_dotlist(["eval.compile_mode=reduce_overhead", "eval.flip=true",
                                                         "model.nms_kernel=torchvision"]))
    with pytest.raises(ConfigError, match=r"on a GPU, not on cpu.*not model.nms_kernel=torchvision: model.nms_kernel="
                                          r"triton.*eval.compile_mode=default.*eval.flip"):
        load_trained_detector(str(tmp_path), wrong, "last", "cpu", compile=True)
    assert cfg.model.nms_kernel == "auto"
    with pytest.raises(CheckpointError, match="checkpoint not found"):  # nothing touches the GPU before
        load_trained_detector(str(tmp_path), cfg, "last", "cuda", compile=True)
    assert cfg.model.nms_kernel == "triton"  # what the detector is built with
    model = build_detector(slim_cfg("none"), num_classes=3)
    with pytest.raises(ConfigError, match="model.nms_kernel=triton"):
        GraphedDetector(model)
    model.rpn.nms_kernel = model.roi_heads.box_predictor.nms_kernel = "triton"
    assert isinstance(for_testing([model], TestTimeOptions(), 600, cuda_graphs=True), GraphedDetector)
    with pytest.raises(ConfigError, match="eval.cuda_graphs"):
        for_testing([model, model], TestTimeOptions(), 600, cuda_graphs=True)


def test_graphed_detector_replays_up_to_max_graphs_and_runs_the_rest_eagerly(monkeypatch, caplog):
    """GraphedDetector's bookkeeping, with a stand-in for the CUDA graph (recording needs a GPU): one graph per
    padded batch shape, whatever the images' own sizes, each new batch and its sizes copied into the graph's
    inputs before the replay; past ``max_graphs``, and where recording fails, that shape runs eagerly (None),
    said in the log; ``strict`` raises the recording's error."""
    from detection.modeling.graphed import GraphedDetector
    from detection.modeling.roi_heads import PaddedDetections

    model = build_detector(slim_cfg("none"), num_classes=3).eval()
    model.rpn.nms_kernel = model.roi_heads.box_predictor.nms_kernel = "triton"
    replays = []

    class StandIn:
        def replay(self):
            replays.append(1)

    def record(images, sizes):
        if images.shape[-1] == 64:
            raise RuntimeError("operation not permitted when stream is capturing")
        padded = PaddedDetections(torch.zeros(1, 5, 4), torch.zeros(1, 5), torch.ones(1, 5, dtype=torch.int64),
                                  torch.zeros(1, dtype=torch.int64))
        return images.clone(), sizes.clone(), StandIn(), padded, ()

    graphed = GraphedDetector(model, max_graphs=2)
    monkeypatch.setattr(graphed, "record", record)
    first, second = (torch.full((1, 3, 32, 32), v, dtype=torch.uint8) for v in (1, 2))
    wide, tall = torch.ones(1, 3, 32, 64, dtype=torch.uint8), torch.ones(1, 3, 64, 32, dtype=torch.uint8)
    assert graphed.replay(first, torch.tensor([[32, 30]])) is not None and len(replays) == 1
    assert graphed.replay(second, torch.tensor([[20, 31]])) is not None and len(replays) == 2  # other sizes
    assert len(graphed.graphs) == 1
    static_images, static_sizes = graphed.graphs[next(iter(graphed.graphs))][:2]
    assert torch.equal(static_images, second) and static_sizes.tolist() == [[20, 31]]  # the graph's inputs
    with caplog.at_level("WARNING", logger="resdet"):
        assert graphed.replay(wide, torch.tensor([[32, 64]])) is None  # failed: eager
    assert "not recorded" in caplog.text and "capturing" in caplog.text
    assert graphed.replay(first.expand(2, -1, -1, -1), torch.tensor([[32, 32], [30, 30]])) is not None  # 2nd graph
    with caplog.at_level("INFO", logger="resdet"):
        assert graphed.replay(tall, torch.tensor([[60, 30]])) is None  # over max_graphs
    assert "2 recorded" in caplog.text and len(graphed.graphs) == 2 and len(replays) == 3
    strict = GraphedDetector(model, strict=True)
    monkeypatch.setattr(strict, "record", record)
    with pytest.raises(RuntimeError, match="capturing"):
        strict.replay(wide, torch.tensor([[32, 64]]))


def torchvision_twin(model, cfg, num_classes):
    """torchvision's ``FasterRCNN`` holding ``model``'s very modules and weights (trunk, RPN head, res5,
    predictor): the independent reference for everything around them (anchors, matching, losses,
    proposals, pooling, decoding, post-processing)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchors
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead as TVRPNHead
    from torchvision.ops import MultiScaleRoIAlign

    class Res4(torch.nn.Module):
        def __init__(self, trunk):
            super().__init__()
            self.trunk, self.out_channels = trunk, trunk.out_channels["res4"]

        def forward(self, x):
            return self.trunk(x)["res4"]

    r, h = cfg.rpn, cfg.roi_heads
    ours_rpn, ours_pred = model.rpn.head, model.roi_heads.box_predictor
    rpn_head = TVRPNHead(ours_rpn.conv.in_channels, ours_rpn.objectness.out_channels)
    predictor = FastRCNNPredictor(ours_pred.cls_score.in_features, num_classes + 1)
    with torch.no_grad():
        for mine, theirs in ((ours_rpn.conv, rpn_head.conv[0][0]), (ours_rpn.objectness, rpn_head.cls_logits),
                             (ours_rpn.anchor_deltas, rpn_head.bbox_pred), (ours_pred.cls_score, predictor.cls_score)):
            theirs.weight.copy_(mine.weight)
            theirs.bias.copy_(mine.bias)
        predictor.bbox_pred.weight.zero_()  # torchvision also regresses the background class (rows 0..3)
        predictor.bbox_pred.bias.zero_()
        predictor.bbox_pred.weight[4:].copy_(ours_pred.bbox_pred.weight)
        predictor.bbox_pred.bias[4:].copy_(ours_pred.bbox_pred.bias)
    return FasterRCNN(
        Res4(model.trunk), num_classes=None, min_size=96, max_size=100000,  # no resizing: scale 1
        image_mean=(model.pixel_mean.flatten() / 255).tolist(), image_std=(model.pixel_std.flatten() / 255).tolist(),
        rpn_anchor_generator=TVAnchors((tuple(r.anchor_sizes),), (tuple(r.aspect_ratios),)), rpn_head=rpn_head,
        rpn_pre_nms_top_n_train=r.pre_nms_topk_train, rpn_post_nms_top_n_train=r.post_nms_topk_train,
        rpn_pre_nms_top_n_test=r.pre_nms_topk_test, rpn_post_nms_top_n_test=r.post_nms_topk_test,
        rpn_batch_size_per_image=r.batch_size_per_image, rpn_positive_fraction=r.positive_fraction,
        box_roi_pool=MultiScaleRoIAlign(["0"], h.pooler_resolution, h.pooler_sampling_ratio),
        box_head=torch.nn.Sequential(model.roi_heads.res5, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
        box_predictor=predictor, box_batch_size_per_image=h.batch_size_per_image,
        box_positive_fraction=h.positive_fraction, box_score_thresh=h.score_thresh,
        box_detections_per_img=h.detections_per_img)


def test_c4_detector_equals_torchvision_faster_rcnn_with_the_same_weights():
    """With torchvision's choices (RoIAlign without the half-pixel shift, smooth-L1 beta 1/9 box loss) and
    sampling made exhaustive (every anchor and proposal used, so no random draw differs), every loss and
    every detection equals torchvision's: whatever resdet does differently is the options, not the code."""
    torch.manual_seed(0)
    cfg = slim_cfg()
    cfg.roi_heads.pooler_type, cfg.roi_heads.smooth_l1_beta = PoolerType.ROIAlign, 1.0 / 9
    cfg.rpn.batch_size_per_image, cfg.rpn.positive_fraction = 10 ** 6, 1.0
    cfg.roi_heads.batch_size_per_image, cfg.roi_heads.positive_fraction = 10 ** 6, 1.0
    cfg.roi_heads.score_thresh = 0.0
    model = build_detector(cfg, num_classes=3)
    with torch.no_grad():  # heads away from their near-zero initialisation, so boxes and scores differ
        for layer in (model.rpn.head.objectness, model.rpn.head.anchor_deltas, model.roi_heads.box_predictor.cls_score,
                      model.roi_heads.box_predictor.bbox_pred):
            layer.weight.normal_(0, 0.05)
            layer.bias.normal_(0, 0.1)
    twin = torchvision_twin(model, cfg, 3)
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8, generator=g)
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0], [60.0, 20.0, 120.0, 90.0]]), "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[30.0, 5.0, 70.0, 90.0]]), "labels": torch.tensor([2])}]
    batch = {"images": images, "image_sizes": [(96, 128)] * 2, "targets": targets}
    tv_images = [img.float() / 255 for img in images]
    model.train(), twin.train()
    ours, theirs = model(batch), twin(tv_images, targets)
    names = {"loss_rpn_cls": "loss_objectness", "loss_rpn_loc": "loss_rpn_box_reg", "loss_cls": "loss_classifier",
             "loss_box_reg": "loss_box_reg"}
    for mine, reference in names.items():
        torch.testing.assert_close(ours[mine], theirs[reference], rtol=1e-5, atol=1e-6, msg=mine)
    model.eval(), twin.eval()
    with torch.no_grad():
        ours, theirs = model(batch), twin(tv_images)
    for a, b in zip(ours, theirs):
        assert len(a["boxes"]) == len(b["boxes"]) > 20
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-5)
        assert torch.equal(a["labels"], b["labels"])


def test_preprocess_zeroes_padding():
    model = build_detector(slim_cfg(), num_classes=2)
    batch = two_image_batch()
    batch["images"][1, :, 80:, :] = 255  # whatever sits in the padding is ignored
    x = model.preprocess(batch["images"], batch["image_sizes"])
    assert (x[1, :, 80:, :] == 0).all() and (x[1, :, :, 100:] == 0).all()
    mean = torch.tensor([0.485, 0.456, 0.406]) * 255
    std = torch.tensor([0.229, 0.224, 0.225]) * 255
    torch.testing.assert_close(x[0, :, 5, 7], (batch["images"][0, :, 5, 7].float() - mean) / std)


def test_backbone_weights_load_and_mismatches(tmp_path):
    resnet = build_resnet(18, num_classes=10, base_width=8)
    with torch.no_grad():
        resnet.stem.bn.running_mean.uniform_(-1, 1)
        resnet.res3[0].bn1.running_var.uniform_(0.5, 2)
    path = tmp_path / "backbone.pth"
    torch.save(backbone_checkpoint(resnet, [0.5, 0.4, 0.3], [0.2, 0.2, 0.2], [str(i) for i in range(10)]), path)

    model = build_detector(slim_cfg(weights=str(path)), num_classes=2)
    torch.testing.assert_close(model.trunk.stem.bn.running_mean, resnet.stem.bn.running_mean)
    torch.testing.assert_close(model.trunk.res3[0].bn1.running_var, resnet.res3[0].bn1.running_var)
    torch.testing.assert_close(model.roi_heads.res5[0].conv1.weight, resnet.res5[0].conv1.weight)
    assert isinstance(model.trunk.res3[0].bn1, FrozenBatchNorm2d)
    torch.testing.assert_close(model.pixel_mean.flatten(), torch.tensor([127.5, 102.0, 76.5]))
    torch.testing.assert_close(model.pixel_std.flatten(), torch.tensor([51.0, 51.0, 51.0]))

    # norm: bn keeps trainable BatchNorm with the loaded statistics
    model = build_detector(slim_cfg(weights=str(path), norm="bn", freeze_at=0), num_classes=2)
    assert isinstance(model.trunk.res3[0].bn1, torch.nn.BatchNorm2d)
    torch.testing.assert_close(model.trunk.res3[0].bn1.running_var, resnet.res3[0].bn1.running_var)

    with pytest.raises(CheckpointError, match=r"base_width: config 16 vs checkpoint 8") as err:
        build_detector(slim_cfg(weights=str(path), base_width=16), num_classes=2)
    assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match=r"depth: config 34 vs checkpoint depth 18"):
        build_detector(slim_cfg(weights=str(path), depth=34), num_classes=2)
    with pytest.raises(CheckpointError, match="stride_in_1x1"):
        build_detector(slim_cfg(weights=str(path), stride_in_1x1=False), num_classes=2)

    broken = backbone_checkpoint(resnet, [0.5] * 3, [0.2] * 3, [])
    del broken["state_dict"]["res4.1.conv2.weight"]
    broken["state_dict"]["res4.1.extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: res4\.1\.conv2\.weight.*unexpected keys: res4\.1\.extra"):
        build_detector(slim_cfg(weights=str(tmp_path / "broken.pth")), num_classes=2)


# -- learning ------------------------------------------------------------------------------------------


def synthetic_shapes(seed=0, sizes=((96, 128), (128, 96), (112, 112), (128, 128))):
    """Rectangles (class 1) and ellipses (class 2) of random colours on noise, padded to 128x128."""
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for h, w in sizes:
        img = rng.normal(110, 30, (h, w, 3)).clip(0, 255)
        yy, xx = np.mgrid[:h, :w]
        boxes, labels = [], []
        wanted = int(rng.integers(1, 4))
        for _ in range(100):
            if len(boxes) == wanted:
                break
            bh = int(rng.integers(24, 56))
            bw = bh if rng.random() < 0.5 else int(bh * rng.uniform(0.6, 1.0))
            x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            box = [x1, y1, x1 + bw, y1 + bh]
            if boxes and box_iou(torch.tensor([box]).float(), torch.tensor(boxes).float()).max() > 0.1:
                continue  # keep the shapes apart
            cls, color = int(rng.integers(1, 3)), rng.integers(0, 256, 3)
            if cls == 1:
                img[y1:y1 + bh, x1:x1 + bw] = color
            else:
                inside = ((xx + 0.5 - x1 - bw / 2) / (bw / 2)) ** 2 + ((yy + 0.5 - y1 - bh / 2) / (bh / 2)) ** 2 <= 1
                img[inside] = color
            boxes.append(box)
            labels.append(cls)
        images.append(img.astype(np.uint8))
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                        "crowd_boxes": torch.zeros(0, 4)})
    batch = torch.zeros(len(images), 3, 128, 128, dtype=torch.uint8)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[0], : im.shape[1]] = torch.from_numpy(im).permute(2, 0, 1)
    return {"images": batch, "image_sizes": [im.shape[:2] for im in images], "targets": targets}


def test_frozen_bn_without_weights_is_named_with_its_fix():
    """The trainer warns at the start (and names it if the loss diverges) when frozen BN has no weights to
    take its statistics from; with weights, or trainable BN, nothing is said."""
    cfg = slim_cfg().backbone  # frozen_bn, no weights
    assert "norm=bn" in unnormalised_backbone(cfg) and "model.backbone.weights=PATH" in unnormalised_backbone(cfg)
    assert unnormalised_backbone(slim_cfg(weights="backbone.pth").backbone) is None
    assert unnormalised_backbone(slim_cfg(norm="bn").backbone) is None


def test_tiny_c4_detector_overfits_synthetic_shapes():
    torch.manual_seed(0)
    cfg = OmegaConf.structured(DetectorConfig)
    cfg.backbone.depth, cfg.backbone.base_width = 18, 16
    cfg.backbone.norm, cfg.backbone.freeze_at = Norm.bn, 0  # from scratch: BN statistics must adapt
    cfg.rpn.anchor_sizes = [16.0, 32.0, 64.0]
    cfg.rpn.pre_nms_topk_train, cfg.rpn.post_nms_topk_train = 300, 100
    cfg.rpn.pre_nms_topk_test, cfg.rpn.post_nms_topk_test = 300, 50
    cfg.rpn.batch_size_per_image = 64
    cfg.roi_heads.batch_size_per_image = 32
    model = build_detector(cfg, num_classes=2)
    batch = synthetic_shapes()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.02, momentum=0.9,
                                weight_decay=1e-4)
    start, history = time.time(), []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 threads can run 10x slower than 1
    try:
        model.train()
        for _ in range(150):
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    elapsed = time.time() - start
    first, last = np.mean(history[:5]), np.mean(history[-5:])
    assert last < 0.5 * first, (first, last)

    model.eval()
    with torch.no_grad():
        detections = model(batch)
    hits, total = 0, 0
    for det, target in zip(detections, batch["targets"]):
        for box, label in zip(target["boxes"], target["labels"]):
            total += 1
            iou = box_iou(box[None], det["boxes"])[0] if len(det["boxes"]) else torch.zeros(0)
            near = torch.nonzero(iou > 0.1, as_tuple=True)[0]
            if len(near):  # the top-scoring detection on this object
                best = near[det["scores"][near].argmax()]
                hits += int(iou[best] > 0.5 and det["labels"][best] == label)
    assert total >= 5 and hits >= 0.7 * total, (hits, total, elapsed)
