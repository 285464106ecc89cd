import pytest
import torch

from ssr_model.backbones import (
    BACKBONE_NAMES,
    Conv4,
    CosineClassifier,
    ResNet12,
    WideResNet,
    build_backbone,
    feature_dim,
)


@pytest.mark.parametrize(
    "name, image_size, expected",
    [
        ("conv4-64", 32, 256),
        ("conv4-64", 80, 1600),
        ("conv4-64", 84, 1600),
        ("resnet12", 32, 2560),
        ("resnet12", 80, 16000),
        ("resnet12", 84, 16000),
        ("wrn-28-10", 32, 640),
        ("wrn-28-10", 80, 640),
    ],
)
def test_feature_dim_table(name, image_size, expected):
    assert feature_dim(name, image_size) == expected


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="conv4-64, resnet12, wrn-28-10"):
        build_backbone("vgg", 32)
    with pytest.raises(ValueError):
        feature_dim("vgg", 32)


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_forward_shape_32px(name):
    torch.manual_seed(0)
    net = build_backbone(name, 32).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, feature_dim(name, 32)) == (2, net.out_dim)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["conv4-64", "resnet12"])
def test_grey_input(name):
    net = build_backbone(name, 32, in_channels=1).eval()
    with torch.no_grad():
        assert net(torch.randn(3, 1, 32, 32)).shape == (3, net.out_dim)


def test_conv4_84px():
    net = build_backbone("conv4-64", 84).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 3, 84, 84)).shape == (2, 1600)


def test_resnet12_train_mode_with_drop_block():
    torch.manual_seed(0)
    net = ResNet12(32, drop_rate=0.1, drop_block_size=2).train()
    out = net(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 2560) and torch.isfinite(out).all()


def test_wrn_key_layout():
    keys = set(WideResNet(32).state_dict())
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    expected = {"conv1.weight"} | {f"bn1.{p}" for p in bn}
    for b in (1, 2, 3):
        for n in range(4):
            prefix = f"block{b}.layer.{n}"
            expected |= {f"{prefix}.conv1.weight", f"{prefix}.conv2.weight"}
            expected |= {f"{prefix}.bn1.{p}" for p in bn} | {f"{prefix}.bn2.{p}" for p in bn}
        expected.add(f"block{b}.layer.0.convShortcut.weight")
    assert keys == expected
    sd = WideResNet(32).state_dict()
    assert sd["block1.layer.0.convShortcut.weight"].shape == (160, 16, 1, 1)
    assert sd["block3.layer.3.conv2.weight"].shape == (640, 640, 3, 3)


def test_wrn_first_block_stride():
    assert WideResNet(32).block1.layer[0].conv1.stride == (1, 1)
    assert WideResNet(80).block1.layer[0].conv1.stride == (2, 2)


def test_conv4_key_layout():
    keys = set(Conv4(32).state_dict())
    assert "conv_blocks.0.layers.Conv.weight" in keys
    assert "conv_blocks.3.layers.BatchNorm.running_var" in keys
    assert len([k for k in keys if k.endswith("Conv.weight")]) == 4
    assert all(k.startswith("conv_blocks.") for k in keys)


def test_resnet12_key_layout():
    sd = ResNet12(32).state_dict()
    for i, width in zip(range(1, 5), (64, 160, 320, 640)):
        for c in ("conv1", "conv2", "conv3"):
            assert sd[f"layer{i}.0.{c}.weight"].shape[0] == width
        assert sd[f"layer{i}.0.downsample.0.weight"].shape[:2] == (width, (3, 64, 160, 320)[i - 1])
        assert f"layer{i}.0.downsample.1.running_mean" in sd
        assert f"layer{i}.0.bn3.bias" in sd
    assert all(k.startswith("layer") for k in sd)


@pytest.mark.parametrize("name", ["conv4-64", "resnet12"])
def test_state_dict_round_trip(name):
    torch.manual_seed(0)
    src = build_backbone(name, 32).eval()
    torch.manual_seed(1)
    dst = build_backbone(name, 32).eval()
    x = torch.randn(2, 3, 32, 32)
    dst.load_state_dict(src.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))


def test_wrn_state_dict_round_trip():
    src = WideResNet(32, widen_factor=2).eval()
    dst = WideResNet(32, widen_factor=2)
    dst.load_state_dict(src.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(x), src(x))


def test_cosine_classifier():
    torch.manual_seed(0)
    head = CosineClassifier(16, 5, scale=10.0)
    feats = torch.randn(4, 16)
    logits = head(feats)
    assert logits.shape == (4, 5)
    assert logits.abs().max() <= 10.0 + 1e-5
    expected = 10.0 * torch.nn.functional.normalize(feats, dim=1) @ torch.nn.functional.normalize(head.weight, dim=1).T
    torch.testing.assert_close(logits, expected)
    assert isinstance(head.scale, torch.nn.Parameter)
    fixed = CosineClassifier(16, 5, scale=5.0, learn_scale=False)
    assert "scale" in dict(fixed.named_buffers())
    with pytest.raises(ValueError, match="dim 8, expected 16"):
        head(torch.randn(2, 8))
