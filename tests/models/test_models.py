"""Backbones, shapes, batch-norm modes, public-checkpoint import and our checkpoint format."""
import os

import pytest
import torch
import torch.nn.functional as F

import sdca
from sdca.models import (
    FrozenBatchNorm2d,
    build_model,
    import_public_checkpoint,
    load_model,
    load_torchvision_weights,
    read_checkpoint,
    save_checkpoint,
    set_batchnorm_mode,
    upsample_logits,
)
from tests.common_utils import public_state


# ---------------------------------------------------------------- an independent functional public model
def _bn(x, sd, p, eps):
    scale = sd[p + ".weight"] / torch.sqrt(sd[p + ".running_var"] + eps)
    shift = sd[p + ".bias"] - sd[p + ".running_mean"] * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def reference_resnet(x, sd, blocks, eps):
    """The public ResNet (torchvision layout, layer3/4 dilated 2/4) written with F.conv2d from the state dict."""
    x = F.relu(_bn(F.conv2d(x, sd["backbone.conv1.weight"], stride=2, padding=3), sd, "backbone.bn1", eps))
    x = F.max_pool2d(x, 3, 2, 1)
    dilation = 1
    for li, (n, stride, dilate) in enumerate(zip(blocks, (1, 2, 2, 2), (False, False, True, True))):
        previous = dilation
        if dilate:  # torchvision: stride becomes dilation; the layer's first block keeps the previous one
            dilation, stride = dilation * stride, 1
        for b in range(n):
            p = f"backbone.layer{li + 1}.{b}"
            s, d = (stride, previous) if b == 0 else (1, dilation)
            out = F.relu(_bn(F.conv2d(x, sd[p + ".conv1.weight"]), sd, p + ".bn1", eps))
            out = F.relu(_bn(F.conv2d(out, sd[p + ".conv2.weight"], stride=s, padding=d, dilation=d), sd, p + ".bn2",
                             eps))
            out = _bn(F.conv2d(out, sd[p + ".conv3.weight"]), sd, p + ".bn3", eps)
            if p + ".downsample.0.weight" in sd:
                x = _bn(F.conv2d(x, sd[p + ".downsample.0.weight"], stride=s), sd, p + ".downsample.1", eps)
            x = F.relu(out + x)
    return x


def reference_vgg(x, sd):
    """DeepLab-LargeFOV VGG-16 as the layout notes describe it: pools after conv1_2/conv2_2/conv3_3 only."""
    for idx in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29, 31):
        d = 4 if idx >= 29 else 2 if idx >= 23 else 1
        x = F.relu(F.conv2d(x, sd[f"backbone.{idx}.weight"], sd[f"backbone.{idx}.bias"], padding=d, dilation=d))
        if idx in (2, 7, 14):
            x = F.max_pool2d(x, 2, 2)
    return x


def reference_aspp(x, cls):
    return sum(F.conv2d(x, cls[f"conv2d_list.{i}.weight"], cls[f"conv2d_list.{i}.bias"], padding=d, dilation=d)
               for i, d in enumerate((6, 12, 18, 24)))


@pytest.mark.parametrize("section,prefix,num_classes", [
    ("resnet101_freeze_bn_True", "", 19), ("resnet101_freeze_bn_True", "module.", 16),
    ("resnet101_freeze_bn_False", "module.", 19), ("vgg16", "", 19), ("vgg16", "module.", 16)])
def test_public_checkpoint_imports_exactly(section, prefix, num_classes):
    ckpt = public_state(section, num_classes, prefix)
    model, report = import_public_checkpoint(ckpt)
    assert report.ok and not report.missing and not report.unexpected and not report.mismatched
    assert model.num_classes == num_classes and model.info.train_size == (1024, 512)
    expected_bn = {"resnet101_freeze_bn_True": "frozen", "resnet101_freeze_bn_False": "train", "vgg16": "frozen"}
    assert model.info.bn == expected_bn[section]
    model = model.double().eval()
    fe = {k[len(prefix):]: v.double() for k, v in ckpt["feature_extractor"].items()}
    cls = {k[len(prefix):]: v.double() for k, v in ckpt["classifier"].items()}
    x = torch.randn(1, 3, 41, 57, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    if section == "vgg16":
        assert model.info.normalization.channel_order == "BGR" and model.info.normalization.scale == 255.0
        feats = reference_vgg(x, fe)
    else:
        eps = 0.0 if section.endswith("True") else 1e-5  # the public frozen BN adds no epsilon
        feats = reference_resnet(x, fe, (3, 4, 23, 3), eps)
    torch.testing.assert_close(out.features, feats, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.logits, reference_aspp(feats, cls), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("section,prefix", [("resnet101_freeze_bn_True", ""), ("resnet101_freeze_bn_False", "module."),
                                            ("vgg16", "")])
def test_public_release_files_load_from_disk_as_weights_only(tmp_path, section, prefix):
    state = public_state(section, 19, prefix)
    # As the public training script writes them: the two state dicts beside an iteration count and optimizers.
    path = tmp_path / "model_best.pth"
    torch.save({**state, "iteration": 40000, "optimizer_fea": {"state": {}, "param_groups": []},
                "optimizer_cls": {"state": {}, "param_groups": []}}, path)
    model = load_model(str(path))
    key = next(iter(state["feature_extractor"]))
    assert torch.equal(model.state_dict()[key[len(prefix):]], state["feature_extractor"][key])


def test_public_checkpoint_errors(tmp_path):
    ckpt = public_state("vgg16", 19)
    with pytest.raises(ValueError, match="predicts 19 classes, expected 16"):
        import_public_checkpoint(ckpt, num_classes=16)
    broken = public_state("vgg16", 19)
    broken["feature_extractor"]["backbone.29.weight"] = torch.zeros(1024, 512, 1, 1)
    with pytest.raises(ValueError, match="shape mismatch: backbone.29.weight"):
        import_public_checkpoint(broken)
    extra = public_state("vgg16", 19)
    extra["feature_extractor"]["backbone.99.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected in the file: backbone.99.weight"):
        import_public_checkpoint(extra)
    path = tmp_path / "model_best.pth"
    torch.save(public_state("vgg16", 16, "module."), path)
    with pytest.raises(ValueError, match=f"{path}.*predicts 16 classes, expected 19"):
        load_model(str(path), num_classes=19)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated.pth: not a readable"):
        load_model(str(truncated))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(str(tmp_path / "absent.pth"))


@pytest.mark.parametrize("name,dim", [("deeplabv2_small", 128), ("deeplabv2_resnet50", 2048),
                                      ("deeplabv2_resnet101", 2048), ("deeplabv2_vgg16", 1024)])
@pytest.mark.parametrize("size", [(65, 97), (64, 128), (33, 17)])
def test_output_stride_and_shapes(name, dim, size):
    model = build_model(name, 19).eval()
    h, w = size
    with torch.no_grad():
        out = model(torch.randn(2, 3, h, w))
    # stride 8: ResNet's stride-2 convs round up ((n + 1) // 2), VGG's 2x2 pools round down.
    if name == "deeplabv2_vgg16":
        expected = (h // 2 // 2 // 2, w // 2 // 2 // 2)
    else:
        expected = ((((h + 1) // 2 + 1) // 2 + 1) // 2, (((w + 1) // 2 + 1) // 2 + 1) // 2)
    assert out.features.shape == (2, dim, *expected)
    assert out.logits.shape == (2, 19, *expected)
    assert upsample_logits(out.logits, (h, w)).shape == (2, 19, h, w)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = build_model("deeplabv2_small", 19, bn="train", width=8, train_size=(256, 128))
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    stats = sdca.SemanticDistribution(19, 64, "diag").state_dict()
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(str(path), model, config={"lr": 0.01}, statistics={"features": stats}, step=7)
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]  # atomic: no temporary left
    loaded = load_model(str(path))
    assert loaded.info == model.info and not loaded.training
    x = torch.randn(1, 3, 61, 83)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.features, b.features)
    raw = read_checkpoint(str(path))
    assert raw["step"] == 7 and raw["config"] == {"lr": 0.01}
    assert torch.equal(raw["statistics"]["features"]["mean"], stats["mean"])
    with pytest.raises(ValueError, match="predicts 19 classes, expected 13"):
        load_model(str(path), num_classes=13)


def test_torchvision_weight_import(tmp_path):
    import torchvision

    ref = torchvision.models.resnet50(weights=None)
    path = tmp_path / "resnet50-imagenet.pth"
    torch.save(ref.state_dict(), path)
    model = build_model("deeplabv2_resnet50", 19, pretrained=str(path))
    assert torch.equal(model.backbone.layer4[2].conv3.weight, ref.layer4[2].conv3.weight)
    assert torch.equal(model.backbone.bn1.running_var, ref.bn1.running_var)
    with pytest.raises(ValueError, match="do not fit deeplabv2_resnet101"):
        build_model("deeplabv2_resnet101", 19, pretrained=str(path))

    vgg = torchvision.models.vgg16(weights=None)
    vpath = tmp_path / "vgg16-imagenet.pth"
    torch.save(vgg.state_dict(), vpath)
    model = build_model("deeplabv2_vgg16", 19)
    report = load_torchvision_weights(model, str(vpath))
    assert torch.equal(model.backbone[23].weight, vgg.features[24].weight)  # conv5_1 after the removed pool4
    assert torch.equal(model.backbone[27].bias, vgg.features[28].bias)
    assert set(report.allowed_missing) == {"backbone.29.weight", "backbone.29.bias", "backbone.31.weight",
                                           "backbone.31.bias"}
    assert model.info.normalization.channel_order == "RGB"  # torchvision VGG weights expect RGB / ImageNet
    with pytest.raises(FileNotFoundError, match="weight file not found"):
        build_model("deeplabv2_resnet50", 19, pretrained=str(tmp_path / "missing.pth"))


def test_frozen_batchnorm_has_no_epsilon_and_converts():
    bn = torch.nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([1e-6, 0.5, 1.0, 2.0]))
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
    frozen = FrozenBatchNorm2d(4)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is accepted and dropped
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    expected = (x - frozen.running_mean.double().view(1, -1, 1, 1)) / frozen.running_var.double().sqrt().view(
        1, -1, 1, 1) * frozen.weight.double().view(1, -1, 1, 1) + frozen.bias.double().view(1, -1, 1, 1)
    torch.testing.assert_close(frozen.double()(x), expected)
    model = build_model("deeplabv2_small", 19, bn="train", width=8).eval()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        before = model(x).logits
        set_batchnorm_mode(model, "frozen")
        after = model(x).logits
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(before, after)  # frozen from a trained BN keeps its eps, so outputs agree


def test_build_model_bad_arguments():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("deeplabv3_resnet101", 19)
    with pytest.raises(ValueError, match="bn must be one of"):
        build_model("deeplabv2_small", 19, bn="group")
    with pytest.raises(ValueError, match="no standard label space has 7 classes"):
        build_model("deeplabv2_small", 7)
    with pytest.raises(ValueError, match="class_names has 2 names"):
        build_model("deeplabv2_small", 3, class_names=["a", "b"])


def test_caffe_vgg16_file_loads_with_its_own_input_convention(tmp_path):
    """The Caffe-converted VGG-16 (vgg16-00b39a1b.pth: classifier Linears at 1/4/6) loads with zero unexpected
    or missing keys (fc6/fc7 excepted, as in the public code) and reads BGR x 255 minus the Caffe mean: the
    model on an RGB [0, 1] image equals the functional DeepLab-LargeFOV on the Caffe-normalised input."""
    import torchvision

    vgg = torchvision.models.vgg16(weights=None)
    state = {k: v for k, v in vgg.state_dict().items() if k.startswith("features.")}
    for i, (o, n) in zip((1, 4, 6), ((4096, 25088), (4096, 4096), (1000, 4096))):
        state[f"classifier.{i}.weight"], state[f"classifier.{i}.bias"] = torch.randn(o, n) * 0.01, torch.zeros(o)
    path = tmp_path / "vgg16-00b39a1b.pth"
    torch.save(state, path)
    model = build_model("deeplabv2_vgg16", 19)
    report = load_torchvision_weights(model, str(path))
    assert report.ok and not report.missing and not report.unexpected and not report.mismatched
    assert sorted(report.ignored) == sorted(f"classifier.{i}.{p}" for i in (1, 4, 6) for p in ("weight", "bias"))
    norm = model.info.normalization
    assert (norm.channel_order, norm.scale, tuple(norm.mean)) == ("BGR", 255.0, (103.939, 116.779, 123.68))

    model = model.double().eval()
    sd = {k: v.double() for k, v in model.state_dict().items() if k.startswith("backbone.")}
    for idx in (29, 31):  # fc6 / fc7 keep their random start: read them from the model, as the reference does
        assert f"backbone.{idx}.weight" in sd
    rgb = torch.rand(1, 3, 41, 57, dtype=torch.float64)
    caffe = rgb.flip(1) * 255 - torch.tensor([103.939, 116.779, 123.68], dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(norm(rgb))
    feats = reference_vgg(caffe, sd)
    torch.testing.assert_close(out.features, feats, rtol=1e-10, atol=1e-8)
    cls = {k[len("classifier."):]: v.double() for k, v in model.state_dict().items() if k.startswith("classifier.")}
    torch.testing.assert_close(out.logits, reference_aspp(feats, cls), rtol=1e-10, atol=1e-8)
    # The conv weights are the file's, at the LargeFOV indices (pool4 and pool5 removed).
    assert torch.equal(model.backbone[23].weight.float(), vgg.features[24].weight)

    # An unknown classifier layout is reported key by key, never silently dropped.
    state["classifier.2.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ValueError, match="classifier.2.weight"):
        load_torchvision_weights(build_model("deeplabv2_vgg16", 19), str(path))
