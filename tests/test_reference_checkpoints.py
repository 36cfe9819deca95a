"""Checkpoints of the reference implementations (PSA, SEAM, EPS, SMAF) load completely into our CAMNet.

The files are written by the tests in the layouts in circulation (``{'Net': {'model_state': ...}}``, a bare
state dict, each with and without the ``module.`` of DataParallel) from a network with ResNet-38's module names
at 1/32 of its widths, so that every test runs in seconds; ``smaf.models.BACKBONES['resnet38d']`` is pointed at
that network where a stage builds the model from the inferred architecture.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smaf import models
from smaf.checkpoint import CheckpointError, load_model, read_checkpoint
from smaf.config import load_config
from smaf.models.cam_net import CAMNet
from smaf.models.resnet38d import BottleneckBlock, ResBlock, ResNet38d
from smaf.models.weights import REFERENCE_HEAD_KEYS, WeightsError, load_weights
from smaf.runtime import SmafError

NUM_CLASSES = 5          # tiny_voc's
FEAT_DIM = 16
TOL = 1e-6


class TinyResNet38d(ResNet38d):
    """ResNet-38's layout and key names (conv1a, b2 .. b7, bn7) at 1/32 of the widths: conv6 has 128 channels."""

    out_channels = 128
    feature_channels: ClassVar[dict] = {"conv3": 8, "conv4": 16, "conv5": 32, "conv6": 128}

    def __init__(self):   # the layout of ResNet38d.__init__, narrower
        nn.Module.__init__(self)
        self.conv1a = nn.Conv2d(3, 2, 3, padding=1, bias=False)
        self.b2, self.b2_1, self.b2_2 = ResBlock(2, 4, 4, stride=2), ResBlock(4, 4, 4), ResBlock(4, 4, 4)
        self.b3, self.b3_1, self.b3_2 = ResBlock(4, 8, 8, stride=2), ResBlock(8, 8, 8), ResBlock(8, 8, 8)
        self.b4 = ResBlock(8, 16, 16, stride=2)
        for k in range(1, 6):
            setattr(self, f"b4_{k}", ResBlock(16, 16, 16))
        self.b5 = ResBlock(16, 16, 32, stride=1, first_dilation=1, dilation=2)
        self.b5_1, self.b5_2 = ResBlock(32, 16, 32, dilation=2), ResBlock(32, 16, 32, dilation=2)
        self.b6 = BottleneckBlock(32, 64, stride=1, dilation=4, dropout=0.3)
        self.b7 = BottleneckBlock(64, 128, dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(128)
        self._freeze()


@pytest.fixture
def tiny_resnet38d(monkeypatch):
    """Models built from an architecture spec with backbone resnet38d get the tiny one."""
    monkeypatch.setitem(models.BACKBONES, "resnet38d", lambda pretrained, output_stride: TinyResNet38d())


def randomised(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)
    return module.eval()


def cam_net(head: str = "smaf", feat_dim: int = FEAT_DIM, seed: int = 0) -> CAMNet:
    return randomised(CAMNet(TinyResNet38d(), NUM_CLASSES, head=head, feat_dim=feat_dim), seed)


def smaf_reference_state(model: CAMNet) -> dict[str, torch.Tensor]:
    """The SMAF reference network's keys for ``model``: flat ResNet-38 keys + cov_feat, bn, fc8."""
    ours_to_reference = {v: k for k, v in REFERENCE_HEAD_KEYS.items()}
    state = {}
    for key, value in model.state_dict().items():
        state[key[len("backbone."):] if key.startswith("backbone.") else ours_to_reference[key]] = value.clone()
    return state


LAYOUTS = ("Net_model_state", "bare", "module", "Net_module")


def write_layout(state: dict, layout: str, path: Path) -> Path:
    if layout in ("module", "Net_module"):
        state = {f"module.{k}": v for k, v in state.items()}
    obj = {"Net": {"model_state": state}, "epoch": 7, "optimizer": {"lr": 0.01}} if layout.startswith("Net") \
        else state
    torch.save(obj, path)
    return path


def outputs(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        logits, cam, _ = model.eval()(x)
    return logits, cam


def assert_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= TOL


INPUT = torch.randn(2, 3, 40, 52, generator=torch.Generator().manual_seed(5))


# ----------------------------------------------------------------------- SMAF reference head (cov_feat, bn, fc8)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_smaf_reference_layouts_round_trip_into_camnet(tmp_path, layout, capsys):
    source = cam_net(seed=1)
    path = write_layout(smaf_reference_state(source), layout, tmp_path / f"{layout}.pth")
    target = cam_net(seed=2)
    report = load_weights(target, path)
    assert report["missing"] == [] and report["unexpected"] == [] and report["shape_mismatched"] == []
    assert len(report["loaded"]) == report["total"]
    assert "smaf layout" in report["summary"] and "cov_feat -> feature_conv" in report["summary"]
    for ours, theirs in zip(outputs(target, INPUT), outputs(source, INPUT)):
        assert_close(ours, theirs)
    assert len(capsys.readouterr().out.strip().splitlines()) == 1


@pytest.mark.parametrize("layout", ["Net_model_state", "module"])
def test_load_model_infers_the_architecture_of_a_reference_file(tmp_path, layout, tiny_resnet38d, capsys):
    source = cam_net(seed=3)
    path = write_layout(smaf_reference_state(source), layout, tmp_path / "checkpoint_cls.pth")
    model, spec = load_model(path, num_classes=NUM_CLASSES, key="fusion.checkpoint")
    assert spec == {"arch": "cam_net", "args": {"num_classes": NUM_CLASSES, "backbone": "resnet38d",
                                                "output_stride": 8, "feat_dim": FEAT_DIM, "head": "smaf"}}
    assert model.arch_spec == spec and isinstance(model.backbone, TinyResNet38d)
    for ours, theirs in zip(outputs(model, INPUT), outputs(source, INPUT)):
        assert_close(ours, theirs)
    line = capsys.readouterr().out.strip()
    assert "reference-layout checkpoint (no smaf meta): inferred cam_net(" in line and str(path) in line
    assert "\n" not in line
    # without the dataset's class count, the SMAF layout still says it: fc8 = C+1 rows, background last
    _, spec = load_model(path)
    assert spec["args"]["num_classes"] == NUM_CLASSES and spec["args"]["head"] == "smaf"


def test_a_reference_cls_head_loads_as_head_cls(tmp_path, tiny_resnet38d, capsys):
    source = cam_net(head="cls", seed=4)
    path = write_layout(smaf_reference_state(source), "bare", tmp_path / "cls.pth")
    model, spec = load_model(path, num_classes=NUM_CLASSES)
    assert spec["args"]["head"] == "cls" and not model.has_background
    for ours, theirs in zip(outputs(model, INPUT), outputs(source, INPUT)):
        assert_close(ours, theirs)
    capsys.readouterr()


# ----------------------------------------------------------------------- fc8 on conv6 (PSA, EPS, SEAM)
@pytest.mark.parametrize("method", ["psa", "eps", "seam"])
def test_conv6_classifiers_are_embedded_exactly(tmp_path, method, tiny_resnet38d, capsys):
    backbone = randomised(TinyResNet38d(), 6)
    rows = NUM_CLASSES if method == "psa" else NUM_CLASSES + 1
    fc8 = torch.randn(rows, 128, 1, 1, generator=torch.Generator().manual_seed(7)) * 0.1
    state = {k: v.clone() for k, v in backbone.state_dict().items()} | {"fc8.weight": fc8}
    if method == "seam":   # the pixel-correlation module: not a CAM head
        state |= {"f8_3.weight": torch.randn(64, 16, 1, 1), "f8_4.weight": torch.randn(128, 32, 1, 1),
                  "f9.weight": torch.randn(192, 195, 1, 1)}
    path = write_layout(state, "Net_module" if method == "seam" else "bare", tmp_path / f"{method}.pth")
    with torch.no_grad():
        cam = F.conv2d(backbone(INPUT)["conv6"], fc8)
    if method == "seam":   # background first in SEAM, last in ours
        cam = torch.cat([cam[:, 1:], cam[:, :1]], 1)

    model, spec = load_model(path, num_classes=NUM_CLASSES)
    assert spec["args"]["head"] == ("cls" if method == "psa" else "smaf")
    assert spec["args"]["feat_dim"] == 128
    logits, ours = outputs(model, INPUT)
    assert_close(ours, cam)
    assert_close(logits, cam.mean(dim=(2, 3)))
    line = capsys.readouterr().out
    assert f"{method} layout" in line and ("dropped 3" in line) == (method == "seam")

    # the same into an existing model of the standard head width
    target = cam_net(head=spec["args"]["head"], feat_dim=128, seed=8)
    load_weights(target, path)
    assert_close(outputs(target, INPUT)[1], cam)
    capsys.readouterr()


# ----------------------------------------------------------------------- strictness
def test_unmappable_heads_are_one_line_errors_naming_keys(tmp_path, tiny_resnet38d):
    good = smaf_reference_state(cam_net(seed=9))
    cases = {
        "rows": (good | {"fc8.weight": torch.randn(NUM_CLASSES + 3, FEAT_DIM, 1, 1)}, "fc8.weight"),
        "unknown": (good | {"fc9.weight": torch.randn(3, 3, 1, 1)}, "fc9.weight"),
        "no_bn": ({k: v for k, v in good.items() if not k.startswith("bn.")}, "bn.weight"),
        "width": (good | {"fc8.weight": torch.randn(NUM_CLASSES + 1, FEAT_DIM + 1, 1, 1)}, "fc8.weight"),
        "no_fc8": ({k: v for k, v in good.items() if k != "fc8.weight"}, "fc8.weight"),
    }
    for name, (state, key) in cases.items():
        path = write_layout(state, "Net_model_state", tmp_path / f"{name}.pth")
        target = cam_net(seed=10)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(WeightsError) as info:
            load_weights(target, path)
        message = str(info.value)
        assert isinstance(info.value, SmafError)
        assert str(path) in message and key in message and "\n" not in message, name
        assert "model.pretrained" in message, name   # the fix
        assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items()), name   # nothing loaded
        with pytest.raises(CheckpointError) as info:
            load_model(path, num_classes=NUM_CLASSES, key="fusion.checkpoint")
        assert "fusion.checkpoint" in str(info.value) and str(path) in str(info.value) and key in str(info.value)
        assert "\n" not in str(info.value)


def test_backbone_only_files_and_backbones_load_as_before(tmp_path, capsys):
    source = cam_net(seed=11)
    reference = write_layout(smaf_reference_state(source), "Net_model_state", tmp_path / "ref.pth")
    # model.pretrained: the file goes into the backbone; its head is reported, with where it can be used
    backbone = TinyResNet38d()
    report = load_weights(backbone, reference)
    assert len(report["loaded"]) == report["total"] and report["missing"] == []
    assert sorted(report["unexpected"]) == sorted(REFERENCE_HEAD_KEYS)
    assert "fusion.checkpoint" in report["summary"]
    # backbone keys only (ImageNet): into a whole model as before, the head left to training
    imagenet = tmp_path / "resnet38d_imagenet.pth"
    torch.save(source.backbone.state_dict(), imagenet)
    target = cam_net(seed=12)
    report = load_weights(target, imagenet)
    assert sorted(report["missing"]) == sorted(v for v in REFERENCE_HEAD_KEYS.values()
                                               if not v.endswith("num_batches_tracked"))
    capsys.readouterr()


class NotATensor:
    """An object in a reference checkpoint's extras: refused, never unpickled in full."""


def test_reference_files_are_loaded_safely(tmp_path, tiny_resnet38d):
    path = tmp_path / "unsafe.pth"
    torch.save({"Net": {"model_state": smaf_reference_state(cam_net(seed=13))}, "args": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="refused") as info:
        load_model(path, num_classes=NUM_CLASSES)
    assert "NotATensor" in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------- the stages
def tiny_cfg(root, work_dir, *extra):
    lst = f"{root}/ImageSets/Segmentation"
    return load_config("demo", [
        f"work_dir={work_dir}", f"data.root={root}", f"data.train_list={lst}/train.txt",
        f"data.infer_list={lst}/train.txt", f"data.val_list={lst}/val.txt", "num_workers=0",
        "train_fusion.crop=64", "train_fusion.resize_long=[56,96]", "train_fusion.batch_size=4",
        "train_fusion.iterations=2", "train_fusion.ckpt_every=2", "train_fusion.val_every=0",
        "train_fusion.log_every=1", "inference.scales=[0.5,1.0]", "fusion.overlays=0", "pseudo_masks.overlays=0",
        *extra])


def test_stages_take_the_authors_classifier_as_stage_0_output(tiny_voc, tmp_path, tiny_resnet38d, capsys):
    from smaf.stages import gen_fusion, gen_pm, train_fusion

    reference = write_layout(smaf_reference_state(cam_net(seed=14)), "Net_module", tmp_path / "eps_cls.pth")
    work = tmp_path / "work"
    cfg = tiny_cfg(tiny_voc, work, f"fusion.checkpoint={reference}", f"train_fusion.checkpoint={reference}",
                   f"pseudo_masks.checkpoint={reference}")
    fusion = gen_fusion.run(cfg)
    ids = (tiny_voc / "ImageSets/Segmentation/train.txt").read_text().split()
    assert fusion["num_images"] == len(ids)
    assert all((work / "fusion" / "cam_npy" / f"{i}.npy").is_file() for i in ids)
    protos = torch.load(work / "fusion" / "prototypes.pt")["prototypes"]
    assert protos.shape == (NUM_CLASSES + 1, FEAT_DIM)

    train_fusion.run(cfg)
    final = read_checkpoint(work / "train_fusion" / "final.pth")
    assert final["meta"]["args"]["backbone"] == "resnet38d" and final["meta"]["args"]["feat_dim"] == FEAT_DIM

    pm = gen_pm.run(cfg)   # pseudo_masks.checkpoint: a reference file too
    assert all((Path(pm["out_dir"]) / "cam_png" / f"{i}.png").is_file() for i in ids)
    out = capsys.readouterr().out
    assert out.count("is a reference-layout checkpoint (no smaf meta)") >= 3
