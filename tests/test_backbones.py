import copy
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import backbones
from backbones import (CheckpointError, build_resnet, convert_torchvision_state_dict, count_multiply_adds,
                       count_parameters, load_backbone_weights, resnet_from_arch)
from backbones.resnet import ProjectionShortcut, ZeroPadShortcut
from conftest import ROOT

# Parameter counts of the 1000-class nets with option B shortcuts (equal to torchvision's).
PARAMS = {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160, 152: 60_192_808}
# Table 1 of the paper: multiply-adds at 224x224, in billions.
PAPER_GMACS = {18: 1.8, 34: 3.6, 50: 3.8, 101: 7.6, 152: 11.3}


@pytest.mark.parametrize("depth", sorted(PARAMS))
def test_parameter_count_matches_known_figure(depth):
    assert count_parameters(build_resnet(depth, num_classes=1000, shortcut="B")) == PARAMS[depth]


@pytest.mark.parametrize("depth", sorted(PAPER_GMACS))
def test_multiply_adds_close_to_paper_table1(depth):
    gmacs = count_multiply_adds(build_resnet(depth)) / 1e9
    assert gmacs == pytest.approx(PAPER_GMACS[depth], rel=0.03)


def test_stride_in_3x3_costs_more_as_in_torchvision():
    paper = count_multiply_adds(backbones.resnet50()) / 1e9
    tv_layout = count_multiply_adds(backbones.resnet50(stride_in_1x1=False)) / 1e9
    assert paper == pytest.approx(3.86, abs=0.01) and tv_layout == pytest.approx(4.09, abs=0.01)


@pytest.mark.parametrize("depth,params_m", [(20, 0.27), (56, 0.85), (110, 1.7)])
def test_cifar_resnets_match_table6(depth, params_m):
    model = backbones.cifar_resnet(depth)
    assert count_parameters(model) / 1e6 == pytest.approx(params_m, rel=0.03)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert model.stage_channels == {"stem": 16, "res2": 16, "res3": 32, "res4": 64}


def test_cifar_depth_must_be_6n_plus_2():
    with pytest.raises(ValueError, match="6n\\+2"):
        backbones.cifar_resnet(21)


def test_shortcut_options():
    a, b, c = (backbones.resnet34(shortcut=s) for s in "ABC")
    plain = backbones.plain34()
    assert count_parameters(a) == count_parameters(plain)  # option A adds no parameters
    assert count_parameters(a) < count_parameters(b) < count_parameters(c)
    assert sum(isinstance(m, ZeroPadShortcut) for m in a.modules()) == 3  # one per stage transition
    assert sum(isinstance(m, ProjectionShortcut) for m in b.modules()) == 3
    assert sum(isinstance(m, ProjectionShortcut) for m in c.modules()) == 16  # every block
    assert all(blk.shortcut is None for stage in ("res2", "res3", "res4", "res5") for blk in getattr(plain, stage))


def test_zero_pad_shortcut_values():
    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    y = ZeroPadShortcut(2, 5, stride=2)(x)
    assert y.shape == (1, 5, 2, 2)
    assert torch.equal(y[:, :2], x[:, :, ::2, ::2]) and not y[:, 2:].any()


def test_named_stages_strides_and_shapes():
    model = backbones.resnet50(num_classes=0, base_width=16)
    assert model.stage_strides == {"stem": 4, "res2": 4, "res3": 8, "res4": 16, "res5": 32}
    assert model.stage_channels == {"stem": 16, "res2": 64, "res3": 128, "res4": 256, "res5": 512}
    feats = model.forward_features(torch.zeros(1, 3, 64, 96), ("res2", "res4"))
    assert set(feats) == {"res2", "res4"}
    assert feats["res2"].shape == (1, 64, 16, 24) and feats["res4"].shape == (1, 256, 4, 6)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 512)


def test_zero_init_last_bn_makes_blocks_identity():
    model = backbones.resnet18(base_width=8, zero_init_last_bn=True).eval()
    block = model.res3[1]
    x = torch.relu(torch.randn(1, 16, 8, 8))
    assert torch.allclose(block(x), x)


def test_freeze_at_freezes_stem_and_res2_with_frozen_bn():
    model = backbones.resnet18(base_width=8, freeze_at=2)
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert not any(p.requires_grad for p in model.res2.parameters())
    assert all(p.requires_grad for p in model.res3.parameters())
    assert isinstance(model.stem.bn, torchvision.ops.FrozenBatchNorm2d)
    assert isinstance(model.res3[0].bn1, nn.BatchNorm2d)


def _randomise_bn(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_conversion_gives_same_outputs(name):
    torch.manual_seed(0)
    tv = getattr(torchvision.models, name)()
    _randomise_bn(tv)
    tv.eval()
    state, arch = convert_torchvision_state_dict(tv.state_dict())
    assert arch["stride_in_1x1"] is False and arch["num_classes"] == 1000
    ours = resnet_from_arch(arch)
    load_backbone_weights(ours, {"arch": arch, "state_dict": state}, strict_head=True)
    ours.eval()
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), atol=1e-5, rtol=1e-5)


def test_mismatched_checkpoint_names_keys_and_options():
    src = backbones.resnet18(base_width=8)
    ckpt = backbones.backbone_checkpoint(src, [0.5] * 3, [0.2] * 3, ["a"])
    with pytest.raises(CheckpointError, match="base_width: checkpoint 8 vs model 16"):
        load_backbone_weights(backbones.resnet18(base_width=16), ckpt, source="x.pth")
    ckpt.pop("arch")
    with pytest.raises(CheckpointError, match=r"x\.pth.*shape mismatch: stem\.conv\.weight"):
        load_backbone_weights(backbones.resnet18(base_width=16), ckpt, source="x.pth")
    del ckpt["state_dict"]["res2.0.conv1.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys: res2\.0\.conv1\.weight"):
        load_backbone_weights(backbones.resnet18(base_width=8), ckpt, source="x.pth")


def test_read_backbone_checkpoint_converts_torchvision_file(tmp_path):
    tv = torchvision.models.resnet18()
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    ckpt = backbones.read_backbone_checkpoint(tmp_path / "tv.pth")
    assert ckpt["arch"]["stage_blocks"] == [2, 2, 2, 2] and ckpt["arch"]["block"] == "basic"
    model = resnet_from_arch(ckpt["arch"], num_classes=0)
    load_backbone_weights(model, ckpt)  # the classifier is dropped for a feature extractor
    torch.testing.assert_close(model.stem.conv.weight, tv.conv1.weight)
    with pytest.raises(CheckpointError, match="not found"):
        backbones.read_backbone_checkpoint(tmp_path / "missing.pth")


@pytest.mark.parametrize("depth", [18, 50])
def test_folded_frozen_bn_gives_the_same_outputs_gradients_and_checkpoints(depth):
    """Frozen BN applied through the convolution weights (fold_frozen_bn) against the plain layers: same
    features, same gradients for the trainable weights, same state_dict keys; a checkpoint loaded after
    folding takes effect (the BN statistics are read at every call)."""
    from backbones.resnet import convert_bn_to_frozen, fold_frozen_bn
    torch.manual_seed(0)
    plain = build_resnet(depth, num_classes=0, base_width=8)
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2.0)
    convert_bn_to_frozen(plain)
    plain.freeze(1)
    folded = copy.deepcopy(plain)
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in folded.modules())
    assert fold_frozen_bn(folded) == n_convs  # every conv here is followed by its (frozen) BN
    assert list(folded.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ya, yb = (net.forward_features(x, ["res4", "res5"]) for net in (plain, folded))
    for k in ya:
        torch.testing.assert_close(yb[k], ya[k], rtol=1e-4, atol=1e-5 * float(ya[k].abs().max()))
    # Gradients in float64: in float32 a pre-activation within rounding of 0 (one was at 1.8e-6) can take
    # the other side of a ReLU in the two nets; with res5 at 2x2 that single element moved 3% of a
    # weight gradient (seen under ATEN_CPU_CAPABILITY=default, one thread). The algebra is what is tested.
    grads = []
    for net in (copy.deepcopy(plain).double(), copy.deepcopy(folded).double()):
        y = net.forward_features(x.double(), ["res4", "res5"])
        (y["res4"].square().mean() + y["res5"].mean()).backward()
        grads.append({n: p.grad for n, p in net.named_parameters() if p.requires_grad})
    ga, gb = grads
    assert set(ga) == set(gb) and not any(n.startswith("stem.") for n in ga)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-9, atol=1e-12 * float(ga[n].abs().max()), msg=n)
    # a state_dict written by the plain net loads into the folded one and changes its output
    other = copy.deepcopy(plain)
    with torch.no_grad():
        for m in other.modules():
            if hasattr(m, "running_mean"):
                m.running_mean.add_(0.5)
    folded.load_state_dict(other.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(folded.forward_features(x, ["res5"])["res5"],
                                   other.forward_features(x, ["res5"])["res5"], rtol=1e-4, atol=1e-4)


def test_is_channels_last_reads_a_kernel_wider_than_1x1():
    """A 1x1 weight is contiguous in both layouts, so the layout is read off a wider kernel (res5 of a
    Bottleneck net starts with a 1x1)."""
    from backbones.resnet import is_channels_last
    net = build_resnet(50, num_classes=0, base_width=8)
    assert not is_channels_last(net.res5)
    net.to(memory_format=torch.channels_last)
    assert is_channels_last(net.res5) and is_channels_last(net)
    assert not is_channels_last(torch.nn.Conv2d(3, 4, 1).to(memory_format=torch.channels_last))


@pytest.mark.parametrize("shortcut", ["A", "B", "C", "none"])
@pytest.mark.parametrize("stride_in_1x1", [True, False])
@pytest.mark.parametrize("in_channels,stride", [(32, 2), (8, 2), (32, 1)])
def test_a_block_that_reads_every_other_position_takes_them_subsampled(shortcut, stride_in_1x1, in_channels, stride):
    """In the paper's layout a strided bottleneck reads its input only at every stride-th row and column (each
    path starts with a strided 1x1 or a subsampling); given just those positions (odd sizes included) and run
    with unit stride it gives the same output and gradients. Everywhere else it reads every position."""
    from backbones.resnet import Bottleneck, convert_bn_to_frozen
    torch.manual_seed(0)
    block = convert_bn_to_frozen(Bottleneck(in_channels, 16, stride, shortcut=shortcut, stride_in_1x1=stride_in_1x1))
    for m in block.modules():  # statistics away from identity
        if isinstance(m, FrozenBatchNorm2d):
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2.0), m.bias.normal_(0, 0.1)
    expected_step = stride if stride_in_1x1 else 1
    assert block.input_read_step() == expected_step
    reference = copy.deepcopy(block)
    block.take_subsampled_input()
    x = torch.randn(2, in_channels, 9, 12)
    ours_in, ref_in = x[:, :, ::expected_step, ::expected_step].clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = block(ours_in), reference(ref_in)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    ours.square().sum().backward(), ref.square().sum().backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad[:, :, ::expected_step, ::expected_step], rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(block.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5, msg=name)
    assert list(block.state_dict()) == list(reference.state_dict())
    assert build_resnet(18, num_classes=0, base_width=8).res5[0].input_read_step() == 1  # a 3x3 reads it all


# Run in a fresh process: without the workaround, oneDNN's strided 1x1 weight gradient on narrow channels-last
# input corrupts the heap (uxlfoundation/oneDNN#6035), which crashes the process on AVX-512 CPUs (input
# channels < 16) and AVX2 ones (< 8), or leaves wrong gradients; the parent reports either.
NARROW_STRIDED_1X1_PROBE = """
import copy, torch, torch.nn.functional as F
from backbones import build_resnet
from backbones.resnet import Bottleneck, ProjectionShortcut, subsample
torch.manual_seed(0)
for channels in (4, 8):  # under AVX2's block of 8 and AVX-512's of 16
    x = torch.randn(4, channels, 40, 64)
    shortcut, block = ProjectionShortcut(channels, 16, 2, "bn"), Bottleneck(channels, 4, 2)
    for conv, step in ((shortcut.conv, shortcut.input_step), (block.conv1, block.input_step)):
        conv.to(memory_format=torch.channels_last)
        xc = x.to(memory_format=torch.channels_last).requires_grad_()
        out = conv(subsample(xc, step))
        g = torch.randn_like(out)
        (out * g).sum().backward()
        # reference: the strided convolution itself, in float64 (not oneDNN's path)
        xd, wd = x.double().requires_grad_(), conv.weight.detach().double().requires_grad_()
        (F.conv2d(xd, wd, stride=2) * g.double()).sum().backward()
        torch.testing.assert_close(conv.weight.grad.double(), wd.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(xc.grad.double(), xd.grad, rtol=1e-4, atol=1e-4)
# a whole slim net at the size that crashed the coco128 test (res3's shortcut sees 8 x 40 x 64)
net = build_resnet(18, num_classes=0, base_width=8)
ref = copy.deepcopy(net).double()
net.to(memory_format=torch.channels_last)
x = torch.randn(2, 3, 160, 256)
net.forward_features(x.to(memory_format=torch.channels_last), ["res5"])["res5"].square().sum().backward()
ref.forward_features(x.double(), ["res5"])["res5"].square().sum().backward()
for (name, p), q in zip(net.named_parameters(), ref.parameters()):
    torch.testing.assert_close(p.grad.double(), q.grad, rtol=1e-3, atol=1e-3 * q.grad.abs().max().item(), msg=name)
print("ok")
"""


def test_narrow_strided_1x1_convolutions_train_right_channels_last():
    """Slim nets (base_width < 16) subsample before their strided 1x1 convolutions instead of striding them;
    gradients equal the strided convolution's in float64, and a channels-last slim ResNet-18 trains at
    160x256 without corrupting the heap."""
    from backbones.resnet import STRIDED_1X1_MIN_CHANNELS, strided_1x1_input_step
    assert STRIDED_1X1_MIN_CHANNELS == 16  # AVX-512's channel block, the larger of the two
    assert [strided_1x1_input_step(c, s) for c, s in ((8, 2), (15, 2), (16, 2), (8, 1), (64, 2))] == [2, 2, 1, 1, 1]
    assert ProjectionShortcut(8, 16, 2, "bn").conv.stride == (1, 1)
    assert ProjectionShortcut(16, 32, 2, "bn").conv.stride == (2, 2)  # wide nets keep the strided convolution
    proc = subprocess.run([sys.executable, "-c", NARROW_STRIDED_1X1_PROBE], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-3000:])
