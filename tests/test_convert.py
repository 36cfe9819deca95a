"""``python -m smaf.models.convert --allow-partial`` and the ResNet-38 path of the model factory with a weights
file (``model.backbone=resnet38d model.pretrained=<file>``): a partial conversion is written only when asked
for, and the factory loads exactly the tensors the file has into the backbone.

The MXNet file is written by the small legacy-layout writer below (tests/test_weights.py covers the reader's
layouts, the full conversion and load_weights itself)."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from smaf.config import load_config
from smaf.models import build_model
from smaf.models.convert import main as convert_main
from smaf.models.weights import WeightsError

RESNET38D_TENSORS = 191


def write_legacy_params(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """MXNet NDArray list, legacy array layout: magic 0x112 + reserved; count + arrays (uint32 ndim, uint32 dims,
    context cpu(0), type flag 0 = float32, raw data); count + names (uint64 length + bytes)."""
    with open(path, "wb") as fh:
        fh.write(struct.pack("<QQQ", 0x112, 0, len(arrays)))
        for array in arrays.values():
            a = np.ascontiguousarray(array, dtype="<f4")
            fh.write(struct.pack("<I", a.ndim) + struct.pack(f"<{a.ndim}I", *a.shape))
            fh.write(struct.pack("<iii", 1, 0, 0) + a.tobytes())
        fh.write(struct.pack("<Q", len(arrays)))
        for name in arrays:
            fh.write(struct.pack("<Q", len(name)) + name.encode())
    return path


@pytest.fixture(scope="module")
def partial_params(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """5 ResNet-38 tensors, one of the wrong shape (3x3 where the model has 1x1) and the ImageNet classifier's
    bias (dropped by the conversion). Returns the file and the arrays by their ResNet38d key."""
    rng = np.random.default_rng(7)
    by_key = {"conv1a.weight": rng.standard_normal((64, 3, 3, 3)).astype(np.float32),
              "bn7.weight": rng.uniform(0.5, 1.5, 4096).astype(np.float32),
              "bn7.running_mean": rng.uniform(-0.5, 0.5, 4096).astype(np.float32),
              "b2.bn_branch2a.running_var": rng.uniform(0.5, 1.5, 64).astype(np.float32),
              "b2.conv_branch1.weight": rng.standard_normal((128, 64, 3, 3)).astype(np.float32)}  # model: 1x1
    names = {"conv1a.weight": "arg:conv1a_weight", "bn7.weight": "arg:bn7_gamma",
             "bn7.running_mean": "aux:bn7_moving_mean", "b2.bn_branch2a.running_var": "aux:bn2a_branch2a_moving_var",
             "b2.conv_branch1.weight": "arg:res2a_branch1_weight"}
    arrays = {names[k]: v for k, v in by_key.items()}
    arrays["arg:linear1000_bias"] = rng.standard_normal(1000).astype(np.float32)
    path = write_legacy_params(tmp_path_factory.mktemp("params") / "partial.params", arrays)
    return path, by_key


@pytest.fixture(scope="module")
def converted(partial_params, tmp_path_factory) -> Path:
    """partial_params converted with --allow-partial (the CLI entry point, in-process)."""
    path, _ = partial_params
    out = tmp_path_factory.mktemp("converted") / "weights" / "resnet38d_partial.pth"
    assert convert_main([str(path), str(out), "--allow-partial"]) == 0
    return out


def test_a_partial_conversion_is_refused_without_allow_partial_and_the_output_is_kept(partial_params, tmp_path,
                                                                                    capsys):
    path, _ = partial_params
    out = tmp_path / "resnet38d.pth"
    out.write_bytes(b"an older conversion")
    assert convert_main([str(path), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: converted 5 tensors from {path} (6 arrays; dropped 1 "
                                                   f"(e.g. linear1000_bias)); ResNet38d: missing 186")
    assert "shape-mismatched 1 (e.g. ('b2.conv_branch1.weight', (128, 64, 3, 3), (128, 64, 1, 1)))" in err
    assert err.endswith("; not written (use --allow-partial to write it anyway)\n")
    assert out.read_bytes() == b"an older conversion" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_allow_partial_writes_exactly_the_converted_tensors(partial_params, converted, capsys):
    path, by_key = partial_params
    state = torch.load(converted, map_location="cpu", weights_only=True)
    assert sorted(state) == sorted(by_key)                                   # the wrong-shaped one included
    for key, array in by_key.items():
        assert state[key].dtype == torch.float32 and torch.equal(state[key], torch.from_numpy(array)), key
    assert sorted(p.name for p in converted.parent.iterdir()) == [converted.name]   # no temp file left


def test_allow_partial_reports_what_is_missing_in_one_line(partial_params, tmp_path, capsys):
    path, _ = partial_params
    out = tmp_path / "again.pth"
    assert convert_main([str(path), str(out), "--allow-partial"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and line.startswith(f"converted 5 tensors from {path} (6 arrays; dropped 1")
    assert "missing 186 (e.g. " in line and "unexpected 0, shape-mismatched 1" in line
    assert line.endswith(f"; wrote {out}\n")


def test_the_factory_loads_a_resnet38d_weights_file_into_the_backbone(partial_params, converted, capsys):
    """model.backbone=resnet38d with model.pretrained=<file>, the way the stages build it: the file's tensors
    are in the backbone, the wrong-shaped one and the absent ones keep their initial values, and the
    architecture recorded for checkpoints does not mention the weights file."""
    _, by_key = partial_params
    cfg = load_config("voc12", [f"model.pretrained={converted}", "model.head=smaf", "model.feat_dim=16"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes=3)
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed == [f"loaded 4/{RESNET38D_TENSORS} tensors from {converted}; missing 186 (e.g. b2.bn_branch2a."
                       f"weight, b2.bn_branch2a.bias, b2.bn_branch2a.running_mean, ...); unexpected 0; "
                       f"shape-mismatched 1 (e.g. b2.conv_branch1.weight [128, 64, 3, 3] vs model [128, 64, 1, 1])"]
    backbone = model.backbone.state_dict()
    for key in ("conv1a.weight", "bn7.weight", "bn7.running_mean", "b2.bn_branch2a.running_var"):
        assert torch.equal(backbone[key], torch.from_numpy(by_key[key])), key
    assert tuple(backbone["b2.conv_branch1.weight"].shape) == (128, 64, 1, 1)
    assert torch.equal(backbone["bn7.bias"], torch.zeros(4096))              # not in the file: BN init
    assert torch.equal(backbone["bn7.running_var"], torch.ones(4096))
    assert model.arch_spec == {"arch": "cam_net", "args": {"num_classes": 3, "backbone": "resnet38d",
                                                           "output_stride": 8, "feat_dim": 16, "head": "smaf"}}


def test_the_factory_refuses_resnet38d_settings_it_cannot_build(tmp_path):
    cfg = load_config("voc12", ["model.head=smaf"]).model
    with pytest.raises(ValueError, match="backbone resnet38d has output stride 8 only, got model.output_stride=16"):
        build_model({**cfg, "output_stride": 16, "pretrained": ""}, num_classes=3)
    with pytest.raises(ValueError, match="must be a weights file path .* not 'imagenet'"):
        build_model({**cfg, "pretrained": "imagenet"}, num_classes=3)
    missing = tmp_path / "weights" / "resnet38d_imagenet.pth"
    with pytest.raises(WeightsError) as info:
        build_model({**cfg, "pretrained": str(missing)}, num_classes=3)
    text = str(info.value)
    assert "\n" not in text and f"python -m smaf.models.convert ilsvrc-cls_rna-a1_cls1000_ep-0001.params {missing}" \
        in text
