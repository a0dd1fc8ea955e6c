"""Weights from elsewhere (backbones/foreign_weights.py): files written in the documented MSRA (Caffe2),
Detectron2 and torchvision layouts from a known resdet model load back to the same outputs, with the
BGR and pixel-normalisation handling; pickles are read safely."""
import os
import pickle

import numpy as np
import pytest
import torch

from backbones import CheckpointError, build_resnet, load_backbone_weights, read_backbone_checkpoint
from backbones.foreign_weights import MSRA_MEAN_BGR, WeightsFormatError, safe_unpickle


def known_resnet50(seed=0):
    """A ResNet-50 (width 16 to stay small) with random weights and BN statistics, in eval mode."""
    torch.manual_seed(seed)
    net = build_resnet(50, num_classes=10, base_width=16)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def fold(bn):
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale.detach().numpy(), (bn.bias - bn.running_mean * scale).detach().numpy()


def msra_blobs(net):
    """The Caffe2 blobs of Detectron's R-50.pkl for ``net``, whose first conv reads BGR (channels reversed)."""
    blobs = {"conv1_w": net.stem.conv.weight.detach().flip(1).numpy()}
    blobs["res_conv1_bn_s"], blobs["res_conv1_bn_b"] = fold(net.stem.bn)
    for s in (2, 3, 4, 5):
        for i, block in enumerate(getattr(net, f"res{s}")):
            for branch, conv, bn in (("2a", block.conv1, block.bn1), ("2b", block.conv2, block.bn2),
                                     ("2c", block.conv3, block.bn3)):
                blobs[f"res{s}_{i}_branch{branch}_w"] = conv.weight.detach().numpy()
                blobs[f"res{s}_{i}_branch{branch}_bn_s"], blobs[f"res{s}_{i}_branch{branch}_bn_b"] = fold(bn)
                blobs[f"res{s}_{i}_branch{branch}_w_momentum"] = np.zeros(1, np.float32)  # training leftovers
            if hasattr(block.shortcut, "conv"):  # a projection (the first block of a stage)
                blobs[f"res{s}_{i}_branch1_w"] = block.shortcut.conv.weight.detach().numpy()
                blobs[f"res{s}_{i}_branch1_bn_s"], blobs[f"res{s}_{i}_branch1_bn_b"] = fold(block.shortcut.bn)
    blobs["fc1000_w"], blobs["fc1000_b"] = net.fc.weight.detach().numpy(), net.fc.bias.detach().numpy()
    return blobs


def assert_same(ours, reference):
    """Equal to 1e-5 of the output's scale: float32 rounding of BN folding, nothing more (a wrong channel
    order or a lost BN statistic is off by the scale itself)."""
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5 * float(reference.abs().max()))


def loaded(path, frozen=True):
    ckpt = read_backbone_checkpoint(str(path))
    net = build_resnet(50, num_classes=ckpt["arch"]["num_classes"], base_width=16,
                       stride_in_1x1=ckpt["arch"]["stride_in_1x1"])
    load_backbone_weights(net, ckpt, strict_head=ckpt["arch"]["num_classes"] > 0)
    if frozen:
        from backbones import convert_bn_to_frozen
        convert_bn_to_frozen(net)
    return net.eval(), ckpt


def test_msra_pkl_loads_to_the_same_network_taking_rgb(tmp_path):
    net = known_resnet50()
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": msra_blobs(net)}, f, protocol=2)  # Detectron's files are Python-2 pickles
    ours, ckpt = loaded(path)
    assert ckpt["arch"]["stage_blocks"] == [3, 4, 6, 3] and ckpt["arch"]["stride_in_1x1"] is True
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_same(ours(x), net(x))
        assert_same(ours.forward_features(x, ["res4"])["res4"], net.forward_features(x, ["res4"])["res4"])
    # what the Caffe2 net expects (BGR, 0-255, mean only) is what the loaded one is told (RGB order)
    norm = ckpt["normalization"]
    assert [255 * m for m in norm["mean"]] == pytest.approx(list(reversed(MSRA_MEAN_BGR)))
    assert [255 * s for s in norm["std"]] == pytest.approx([1.0, 1.0, 1.0])


def test_msra_weights_set_the_detectors_pixel_normalisation(tmp_path):
    from omegaconf import OmegaConf

    from detection.modeling import DetectorConfig
    from detection.modeling.build import build_backbone
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump(msra_blobs(known_resnet50()), f)  # bare blobs, as some copies hold
    cfg = OmegaConf.structured(DetectorConfig).backbone
    cfg.depth, cfg.base_width, cfg.weights = 50, 16, str(path)
    _, mean, std = build_backbone(cfg)
    assert mean == pytest.approx([122.7717, 115.9465, 102.9801]) and std == pytest.approx([1.0, 1.0, 1.0])


def test_detectron2_checkpoint_loads_the_backbone(tmp_path):
    net = known_resnet50(1)
    model = {}
    for key, value in net.state_dict().items():  # resdet names -> Detectron2's C4 names
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        new = key.replace("stem.conv.", "stem.conv1.").replace("stem.bn.", "stem.conv1.norm.")
        new = new.replace("shortcut.conv.", "shortcut.").replace("shortcut.bn.", "shortcut.norm.")
        for i in (1, 2, 3):
            new = new.replace(f".bn{i}.", f".conv{i}.norm.")
        value = value.detach().numpy()
        if new == "stem.conv1.weight":
            value = value[:, ::-1].copy()  # Detectron2's models read BGR
        model[("roi_heads." if new.startswith("res5") else "backbone.") + new] = value
    model["roi_heads.box_predictor.cls_score.weight"] = np.zeros((81, 2048), np.float32)  # left out
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": model, "__author__": "Detectron2 Model Zoo"}, f)
    ours, ckpt = loaded(path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = net.forward_features(x, ["res5"])["res5"]
        assert_same(ours.forward_features(x, ["res5"])["res5"], ref)


def test_unknown_layout_lists_its_first_keys(tmp_path):
    path = tmp_path / "mystery.pkl"
    with open(path, "wb") as f:
        pickle.dump({"encoder.weight": np.zeros(3), "decoder.bias": np.zeros(2)}, f)
    with pytest.raises(CheckpointError, match=r"mystery.pkl: neither a resdet.*first keys: \['decoder.bias', "
                                              r"'encoder.weight'\]"):
        read_backbone_checkpoint(str(path))


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {EXPLOIT_MARKER}",))


EXPLOIT_MARKER = "/tmp/resdet_exploit_ran"


def test_a_malicious_pickle_is_refused_without_running_its_code(tmp_path):
    if os.path.exists(EXPLOIT_MARKER):
        os.remove(EXPLOIT_MARKER)
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": {"conv1_w": np.zeros((1, 3, 7, 7), np.float32), "evil": Exploit()}}, f)
    with pytest.raises(WeightsFormatError, match=r"refused to load (posix|os)\.system"):
        safe_unpickle(str(path))
    with pytest.raises(CheckpointError, match="refused"):
        read_backbone_checkpoint(str(path))
    assert not os.path.exists(EXPLOIT_MARKER)
    # plain arrays and containers still load (and a torch.save file stays weights_only)
    with open(path, "wb") as f:
        pickle.dump({"a": np.arange(3), "b": [1, 2.5, "x"]}, f)
    loaded_obj = safe_unpickle(str(path))
    assert loaded_obj["a"].tolist() == [0, 1, 2] and loaded_obj["b"] == [1, 2.5, "x"]
