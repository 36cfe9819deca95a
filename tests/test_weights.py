"""MXNet .params reader, MXNet -> ResNet38d conversion (library and CLI) and weights loading in every layout.

The test writes .params files with its own writer, following MXNet's format (src/ndarray/ndarray.cc:
list magic 0x112 + reserved, uint64 count + arrays, uint64 count + names as uint64 length + bytes; each array in
the legacy layout (uint32 ndim + uint32 dims) or with the V1/V2/V3 magics (int32 ndim + int64 dims; V2/V3 with an
int32 storage type first), then context (int32 dev_type, int32 dev_id), int32 type flag and the raw data).
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from smaf.models.convert import main as convert_main
from smaf.models.convert import mxnet_key_to_torch, mxnet_to_resnet38d
from smaf.models.mxnet_params import read_mxnet_params
from smaf.models.resnet38d import ResNet38d
from smaf.models.weights import WeightsError, load_weights, read_state_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
RESNET38D_TENSORS = 191  # 43 convolutions + 37 BatchNorms x 4 (the BN counters not counted)

# ------------------------------------------------------------------------------------- test-side writer
MAGICS = {"v1": 0xF993FAC8, "v2": 0xF993FAC9, "v3": 0xF993FACA}
TYPE_FLAGS = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.float16): 2, np.dtype(np.uint8): 3,
              np.dtype(np.int32): 4, np.dtype(np.int8): 5, np.dtype(np.int64): 6}
CPU_CONTEXT, GPU_CONTEXT = (1, 0), (2, 1)


def encode_ndarray(array: np.ndarray | None, layout: str, storage_type: int = 0, context=CPU_CONTEXT,
                   type_flag: int | None = None, raw: bytes | None = None) -> bytes:
    """One NDArray in ``layout`` ('legacy', 'v1', 'v2', 'v3'). ``array=None`` writes an empty NDArray."""
    shape = () if array is None else array.shape
    if layout == "legacy":
        header = struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}I", *shape)
    elif layout == "v1":
        header = struct.pack("<Ii", MAGICS[layout], len(shape)) + struct.pack(f"<{len(shape)}q", *shape)
    else:
        ndim = -1 if (array is None and layout == "v3") else len(shape)
        header = struct.pack("<Iii", MAGICS[layout], storage_type, ndim) + struct.pack(f"<{len(shape)}q", *shape)
    if array is None:
        return header
    flag = TYPE_FLAGS[array.dtype] if type_flag is None else type_flag
    data = raw if raw is not None else np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    return header + struct.pack("<ii", *context) + struct.pack("<i", flag) + data


def write_params(path: Path, named_arrays: dict, layout: str) -> Path:
    """An NDArray-list file; values are arrays (encoded in ``layout``) or pre-encoded bytes."""
    with open(path, "wb") as fh:
        fh.write(struct.pack("<QQ", 0x112, 0))
        fh.write(struct.pack("<Q", len(named_arrays)))
        for i, value in enumerate(named_arrays.values()):
            fh.write(value if isinstance(value, bytes) else
                     encode_ndarray(value, layout, context=GPU_CONTEXT if i % 2 else CPU_CONTEXT))
        fh.write(struct.pack("<Q", len(named_arrays)))
        for name in named_arrays:
            encoded = name.encode("utf-8")
            fh.write(struct.pack("<Q", len(encoded)) + encoded)
    return path


def sample_arrays(rng: np.random.Generator, with_scalar: bool = False) -> dict[str, np.ndarray]:
    arrays = {
        "arg:conv1a_weight": rng.standard_normal((64, 3, 3, 3)).astype(np.float32),
        "arg:res2a_branch1_weight": rng.standard_normal((128, 64, 1, 1)).astype(np.float32),
        "arg:bn2a_branch2a_gamma": rng.standard_normal(64),  # float64
        "aux:bn2a_branch2a_moving_var": rng.random(64).astype(np.float16),
        "aux:bn4b3_branch2b1_moving_mean": rng.standard_normal(512).astype(np.float32),
        "arg:linear1000_bias": rng.standard_normal(1000).astype(np.float32),
        "aux:counts_uint8": rng.integers(0, 256, (2, 3, 4), dtype=np.uint8),
        "aux:index_int32": rng.integers(-2**31, 2**31 - 1, 7, dtype=np.int32),
        "aux:small_int8": rng.integers(-128, 127, (3, 3), dtype=np.int8),
        "aux:big_int64": rng.integers(-2**62, 2**62, (2, 1, 2, 1, 2), dtype=np.int64),
        "aux:zero_size": np.zeros((0, 5), dtype=np.float32),
    }
    if with_scalar:  # only NumPy shape semantics (V3) can express a 0-d array
        arrays["arg:scalar"] = np.array(3.5, dtype=np.float32)
    return arrays


# ---------------------------------------------------------------------- inverse of the key mapping (test side)
def torch_key_to_mxnet(key: str) -> str:
    """ResNet38d state-dict key -> the name in ilsvrc-cls_rna-a1_cls1000_ep-0001.params."""
    bn_suffix = {"weight": ("arg", "gamma"), "bias": ("arg", "beta"), "running_mean": ("aux", "moving_mean"),
                 "running_var": ("aux", "moving_var")}
    parts = key.split(".")
    if key == "conv1a.weight":
        return "arg:conv1a_weight"
    if parts[0] == "bn7":
        kind, suffix = bn_suffix[parts[1]]
        return f"{kind}:bn7_{suffix}"
    block, layer, param = parts
    stage, _, index = block[1:].partition("_")
    block_name = f"{stage}a" if not index else f"{stage}b{index}"
    layer_kind, branch = layer.split("_", 1)
    if layer_kind == "conv":
        return f"arg:res{block_name}_{branch}_weight"
    kind, suffix = bn_suffix[param]
    return f"{kind}:bn{block_name}_{branch}_{suffix}"


@pytest.fixture(scope="module")
def resnet_state() -> dict[str, torch.Tensor]:
    """A ResNet38d state dict (no BN counters) with random weights and random BN statistics."""
    torch.manual_seed(0)
    model = ResNet38d()
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.weight.uniform_(0.5, 1.5)
                layer.bias.uniform_(-0.5, 0.5)
                layer.running_mean.uniform_(-0.5, 0.5)
                layer.running_var.uniform_(0.5, 1.5)
    return {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


@pytest.fixture(scope="module")
def target_model() -> ResNet38d:
    """One ResNet38d that the loading tests load into (each test overwrites every tensor it checks)."""
    return ResNet38d()


SENTINEL = -3.0  # no value of resnet_state (BN stats in [-0.5, 1.5], Kaiming-initialised convolutions) is exactly this


def scrubbed(model: nn.Module) -> nn.Module:
    """Every floating tensor of ``model`` (parameters and buffers: BN running stats too) set to SENTINEL, so a
    tensor that loading does not write cannot pass for one it did."""
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.fill_(SENTINEL)
    return model


def assert_same_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    actual = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


# ------------------------------------------------------------------------------------------ reader
@pytest.mark.parametrize("layout", ["legacy", "v1", "v2", "v3"])
def test_reader_round_trips_every_layout(tmp_path, layout):
    arrays = sample_arrays(np.random.default_rng(1), with_scalar=layout == "v3")
    path = write_params(tmp_path / f"{layout}.params", arrays, layout)
    loaded = read_mxnet_params(path)
    assert list(loaded) == list(arrays)
    for name, expected in arrays.items():
        assert loaded[name].dtype == expected.dtype, name
        assert loaded[name].shape == expected.shape, name
        assert np.array_equal(loaded[name], expected), name
        assert loaded[name].flags.writeable


def test_reader_bfloat16_and_bool(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 0.0, 1e-20], dtype=np.float32)
    truncated = (values.view(np.uint32) & 0xFFFF0000).view(np.float32)  # exactly representable in bfloat16
    bf16_bytes = (truncated.view(np.uint32) >> 16).astype("<u2").tobytes()
    mask = np.array([[True, False], [False, True]])
    named = {"arg:bf16": encode_ndarray(truncated, "v2", type_flag=12, raw=bf16_bytes),
             "aux:mask": encode_ndarray(mask, "v2", type_flag=7, raw=mask.astype(np.uint8).tobytes())}
    loaded = read_mxnet_params(write_params(tmp_path / "bf16.params", named, "v2"))
    assert loaded["arg:bf16"].dtype == np.float32 and np.array_equal(loaded["arg:bf16"], truncated)
    assert loaded["aux:mask"].dtype == np.bool_ and np.array_equal(loaded["aux:mask"], mask)


@pytest.mark.parametrize("layout", ["legacy", "v1", "v2", "v3"])
def test_reader_skips_empty_ndarrays(tmp_path, layout):
    before, after = np.arange(6, dtype=np.float32).reshape(2, 3), np.arange(4, dtype=np.int64)
    named = {"arg:before": encode_ndarray(before, layout), "arg:empty": encode_ndarray(None, layout),
             "arg:after": encode_ndarray(after, layout)}
    path = write_params(tmp_path / "empty.params", named, layout)
    with pytest.warns(UserWarning, match="arg:empty"):
        loaded = read_mxnet_params(path)
    assert list(loaded) == ["arg:before", "arg:after"]
    assert np.array_equal(loaded["arg:before"], before) and np.array_equal(loaded["arg:after"], after)


def test_reader_rejects_sparse_storage(tmp_path):
    named = {"arg:sparse": encode_ndarray(np.zeros((4, 2), np.float32), "v2", storage_type=1)}
    path = write_params(tmp_path / "sparse.params", named, "v2")
    with pytest.raises(ValueError, match="row_sparse") as info:
        read_mxnet_params(path)
    assert str(path) in str(info.value)


def test_reader_truncated_and_corrupt_files(tmp_path):
    path = write_params(tmp_path / "good.params", sample_arrays(np.random.default_rng(2)), "v2")
    content = path.read_bytes()
    # Cut inside: the list header, the array count, an array header, array data, the names.
    for cut in (4, 20, 30, 60, len(content) // 2, len(content) - 3):
        bad = tmp_path / f"cut_{cut}.params"
        bad.write_bytes(content[:cut])
        with pytest.raises(ValueError, match="truncated") as info:
            read_mxnet_params(bad)
        message = str(info.value)
        assert str(bad) in message and "expected" in message and "\n" not in message

    bad_magic = tmp_path / "magic.params"
    bad_magic.write_bytes(struct.pack("<QQ", 0x113, 0) + content[16:])
    with pytest.raises(ValueError, match="0x112"):
        read_mxnet_params(bad_magic)

    bad_type = tmp_path / "type.params"
    write_params(bad_type, {"arg:x": encode_ndarray(np.zeros(3, np.float32), "v2", type_flag=99)}, "v2")
    with pytest.raises(ValueError, match="type flag 99"):
        read_mxnet_params(bad_type)

    # Corrupt headers: absurd sizes are reported, never allocated.
    huge = tmp_path / "huge.params"
    huge_dims = struct.pack("<Iii2q", 0xF993FAC9, 0, 2, 2**40, 2**40) + struct.pack("<iii", 1, 0, 0)
    write_params(huge, {"arg:x": huge_dims}, "v2")
    with pytest.raises(ValueError, match="truncated"):
        read_mxnet_params(huge)
    many_dims = tmp_path / "ndim.params"
    write_params(many_dims, {"arg:x": struct.pack("<I", 4000)}, "legacy")
    with pytest.raises(ValueError, match="implausible ndim 4000"):
        read_mxnet_params(many_dims)

    with pytest.raises(FileNotFoundError):
        read_mxnet_params(tmp_path / "absent.params")


# ------------------------------------------------------------------------------------------ conversion
def test_key_mapping_covers_every_resnet38d_key(resnet_state):
    mxnet_names = [torch_key_to_mxnet(k) for k in resnet_state]
    assert len(set(mxnet_names)) == RESNET38D_TENSORS == len(resnet_state)
    for key, name in zip(resnet_state, mxnet_names):
        assert mxnet_key_to_torch(name) == key, name
        assert mxnet_key_to_torch(name.split(":", 1)[1]) == key  # the prefix is optional
    # A few spelled out, as they appear in the real file.
    assert mxnet_key_to_torch("arg:res4b3_branch2a_weight") == "b4_3.conv_branch2a.weight"
    assert mxnet_key_to_torch("aux:bn2a_branch2a_moving_mean") == "b2.bn_branch2a.running_mean"
    assert mxnet_key_to_torch("arg:bn7_beta") == "bn7.bias"
    assert mxnet_key_to_torch("arg:res7a_branch1_weight") == "b7.conv_branch1.weight"
    assert mxnet_key_to_torch("arg:bn6a_branch2b2_gamma") == "b6.bn_branch2b2.weight"
    assert mxnet_key_to_torch("arg:linear1000_weight") is None
    assert mxnet_key_to_torch("arg:linear1000_bias") is None
    for foreign in ("arg:fc1_weight", "arg:res4b3_branch2a_bias", "arg:stage1_unit1_conv1_weight"):
        with pytest.raises(ValueError, match="ResNet-38|suffix"):
            mxnet_key_to_torch(foreign)


def test_conversion_of_a_small_subset(tmp_path):
    rng = np.random.default_rng(3)
    arrays = {"arg:conv1a_weight": rng.standard_normal((64, 3, 3, 3)).astype(np.float32),
              "aux:bn5b2_branch2b1_moving_var": rng.random(512).astype(np.float32),
              "arg:linear1000_weight": rng.standard_normal((1000, 4096)).astype(np.float32)}
    state = mxnet_to_resnet38d(read_mxnet_params(write_params(tmp_path / "s.params", arrays, "legacy")))
    assert sorted(state) == ["b5_2.bn_branch2b1.running_var", "conv1a.weight"]
    assert torch.equal(state["conv1a.weight"], torch.from_numpy(arrays["arg:conv1a_weight"]))


def run_convert_cli(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "smaf.models.convert", *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_full_conversion_with_the_cli(tmp_path, resnet_state):
    rng = np.random.default_rng(4)
    named = {torch_key_to_mxnet(k): v.numpy() for k, v in resnet_state.items()}
    named["arg:linear1000_weight"] = rng.standard_normal((1000, 4096)).astype(np.float32)
    named["arg:linear1000_bias"] = rng.standard_normal(1000).astype(np.float32)
    params = write_params(tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params", named, "legacy")
    out = tmp_path / "weights" / "resnet38d_imagenet.pth"

    result = run_convert_cli(params, out)
    assert result.returncode == 0, result.stderr
    assert f"converted {RESNET38D_TENSORS} tensors" in result.stdout
    assert "dropped 2" in result.stdout and "missing 0" in result.stdout and "unexpected 0" in result.stdout

    converted = torch.load(out, map_location="cpu", weights_only=True)
    assert set(converted) == set(resnet_state)
    for key, value in resnet_state.items():
        assert converted[key].dtype == torch.float32 and torch.equal(converted[key], value), key
    # Loading such a plain state dict is covered by test_checkpoint_layouts_load_into_resnet38d[plain].


def test_convert_cli_errors_are_one_line(tmp_path, capsys):
    # One real subprocess (exit status, no traceback); the other cases call the same entry point in-process.
    result = run_convert_cli(tmp_path / "absent.params", tmp_path / "out.pth")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "absent.params" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr

    truncated = tmp_path / "truncated.params"
    good = write_params(tmp_path / "good.params", {"arg:conv1a_weight": np.zeros((64, 3, 3, 3), np.float32)}, "v2")
    truncated.write_bytes(good.read_bytes()[:100])
    assert convert_main([str(truncated), str(tmp_path / "out.pth")]) == 2
    stderr = capsys.readouterr().err.strip()
    assert stderr.startswith("error:") and "truncated" in stderr and len(stderr.splitlines()) == 1

    # Well formed but only one tensor of the model: refused, nothing written.
    assert convert_main([str(good), str(tmp_path / "out.pth")]) == 2
    stderr = capsys.readouterr().err.strip()
    assert "missing 190" in stderr and "not written" in stderr and len(stderr.splitlines()) == 1
    assert not (tmp_path / "out.pth").exists()


# ------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("layout", ["plain", "module", "Net_model_state", "state_dict", "psa_fc8"])
def test_checkpoint_layouts_load_into_resnet38d(tmp_path, resnet_state, target_model, layout, capsys):
    state = dict(resnet_state)
    if layout == "plain":
        checkpoint = state
    elif layout == "module":
        checkpoint = {f"module.{k}": v for k, v in state.items()}
    elif layout == "Net_model_state":
        checkpoint = {"epoch": 3, "Net": {"model_state": state}, "optimizer_state": {"lr": 0.01}}
    elif layout == "state_dict":
        checkpoint = {"state_dict": state, "iteration": 10}
    else:  # PSA / SEAM / EPS: the backbone keys plus the classifier
        checkpoint = {**state, "fc8.weight": torch.randn(21, 4096, 1, 1)}
    path = tmp_path / f"{layout}.pth"
    torch.save(checkpoint, path)

    scrubbed(target_model)  # parameters and buffers: stale running stats from an earlier case cannot pass
    assert all(torch.all(v == SENTINEL) for k, v in target_model.state_dict().items() if k in resnet_state)
    report = load_weights(target_model, path)
    assert report["format"] == "torch"
    assert len(report["loaded"]) == report["total"] == RESNET38D_TENSORS
    assert report["missing"] == [] and report["shape_mismatched"] == []
    assert report["unexpected"] == (["fc8.weight"] if layout == "psa_fc8" else [])
    assert_same_state(target_model, resnet_state)

    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0] == report["summary"]
    assert printed[0].startswith(f"loaded {RESNET38D_TENSORS}/{RESNET38D_TENSORS} tensors from {path}; missing 0;")
    expected_unexpected = "unexpected 1 (e.g. fc8.weight)" if layout == "psa_fc8" else "unexpected 0"
    assert expected_unexpected in printed[0] and "shape-mismatched 0" in printed[0]


def test_load_directly_from_mxnet_params_and_partial_report(tmp_path, resnet_state, capsys):
    subset_keys = ["conv1a.weight", "b3.conv_branch2a.weight", "bn7.running_var"]
    named = {torch_key_to_mxnet(k): resnet_state[k].numpy() for k in subset_keys}
    named["arg:res2a_branch1_weight"] = np.zeros((128, 64, 3, 3), np.float32)  # wrong shape (1x1 expected)
    path = write_params(tmp_path / "partial.params", named, "v3")
    target_model = scrubbed(ResNet38d())  # fresh: no earlier test's loaded values in it
    report = load_weights(target_model, path)
    assert report["format"] == "mxnet"
    assert sorted(report["loaded"]) == sorted(subset_keys)
    assert report["shape_mismatched"] == [("b2.conv_branch1.weight", (128, 64, 3, 3), (128, 64, 1, 1))]
    assert len(report["missing"]) == RESNET38D_TENSORS - 4 and "b2.conv_branch1.weight" not in report["missing"]
    after = target_model.state_dict()
    for key in subset_keys:
        assert torch.equal(after[key], resnet_state[key]), key
    # Partial: every tensor not in the file, and the shape-mismatched one, is left as it was.
    for key in [*report["missing"], "b2.conv_branch1.weight"]:
        assert torch.all(after[key] == SENTINEL), key
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"loaded 3/{RESNET38D_TENSORS} tensors")
    assert "shape-mismatched 1 (e.g. b2.conv_branch1.weight [128, 64, 3, 3] vs model [128, 64, 1, 1])" in line
    with pytest.raises(WeightsError, match="strict"):
        load_weights(target_model, path, strict=True)


class TinyBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1a = nn.Conv2d(3, 4, 3, bias=False)
        self.bn7 = nn.BatchNorm2d(4)


class TinyWholeModel(nn.Module):
    """Stands for CAMNet: ``backbone.*`` + head keys."""

    def __init__(self):
        super().__init__()
        self.backbone = TinyBackbone()
        self.classifier = nn.Conv2d(4, 3, 1, bias=False)


class NotATensor:
    """A custom object in a checkpoint's extras: the weights-only loader refuses the file (issue 20: it used to
    fall back to full unpickling, which runs code from the file)."""


def randomised(module: nn.Module) -> nn.Module:
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor))
    return module


def test_smaf_checkpoints_load_strictly(tmp_path, capsys):
    source = randomised(TinyWholeModel())
    path = tmp_path / "final.pth"
    # extras of numpy values (the RNG state of a training checkpoint) load weights-only
    torch.save({"format": "smaf", "model": source.state_dict(), "meta": {"backbone": "tiny"},
                "extra": {"numpy": np.random.get_state(), "best": np.float64(0.5)}}, path)

    whole = TinyWholeModel()
    report = load_weights(whole, path)
    assert report["format"] == "smaf" and len(report["loaded"]) == report["total"] == 6
    assert_same_state(whole, source.state_dict())

    # Into the backbone alone: the head is ignored (reported), the rest must fit exactly.
    backbone = TinyBackbone()
    report = load_weights(backbone, path)
    assert report["ignored"] == ["classifier.weight"] and len(report["loaded"]) == 5
    assert "ignored 1 outside 'backbone.'" in report["summary"]
    assert_same_state(backbone, source.backbone.state_dict())

    # Any mismatch is an error listing the keys, and nothing is loaded.
    broken = {k: v for k, v in source.state_dict().items() if k != "classifier.weight"}
    broken["backbone.extra.weight"] = torch.zeros(1)
    torch.save({"format": "smaf", "model": broken}, path)
    untouched = TinyWholeModel()
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    with pytest.raises(WeightsError) as info:
        load_weights(untouched, path)
    message = str(info.value)
    assert "classifier.weight" in message and "backbone.extra.weight" in message and "\n" not in message
    assert_same_state(untouched, before)

    # A custom object is refused in one line (never unpickled in full), and nothing is loaded.
    torch.save({"format": "smaf", "model": source.state_dict(), "meta": {"backbone": "tiny"},
                "extra": NotATensor()}, path)
    with pytest.raises(WeightsError, match="refused") as info:
        load_weights(untouched, path)
    assert "NotATensor" in str(info.value) and "--trust-pickle" in str(info.value) and "\n" not in str(info.value)
    assert_same_state(untouched, before)
    capsys.readouterr()


def test_backbone_prefix_is_added_or_selected(tmp_path):
    # PSA-style flat backbone keys (+ fc8) into a whole model: 'backbone.' is added.
    source = randomised(TinyBackbone())
    path = tmp_path / "psa.pth"
    torch.save({**source.state_dict(), "fc8.weight": torch.zeros(3, 4, 1, 1)}, path)
    whole = TinyWholeModel()
    report = load_weights(whole, path)
    assert len(report["loaded"]) == 5 and report["missing"] == ["classifier.weight"]
    assert report["unexpected"] == ["backbone.fc8.weight"]
    assert_same_state(whole.backbone, source.state_dict())

    # Explicit prefix: take only the keys under it.
    path = tmp_path / "nested.pth"
    torch.save({"model": {f"encoder.{k}": v for k, v in source.state_dict().items()} | {"decoder.w": torch.ones(1)}},
               path)
    backbone = TinyBackbone()
    report = load_weights(backbone, path, prefix="encoder.")
    assert len(report["loaded"]) == 5 and report["ignored"] == ["decoder.w"]
    assert_same_state(backbone, source.state_dict())
    assert set(read_state_dict(path)) == {f"encoder.{k}" for k in source.state_dict()} | {"decoder.w"}


def test_missing_and_unreadable_files_give_one_line_errors(tmp_path, target_model):
    missing = tmp_path / "weights" / "resnet38d_imagenet.pth"
    with pytest.raises(WeightsError) as info:
        load_weights(target_model, missing)
    message = str(info.value)
    assert "\n" not in message and str(missing) in message
    assert "ilsvrc-cls_rna-a1_cls1000_ep-0001.params" in message
    assert f"python -m smaf.models.convert ilsvrc-cls_rna-a1_cls1000_ep-0001.params {missing}" in message

    with pytest.raises(WeightsError, match="not found") as info:
        read_state_dict(tmp_path / "stage0.pth")
    assert "\n" not in str(info.value)

    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(WeightsError, match="cannot read") as info:
        read_state_dict(corrupt)
    assert "\n" not in str(info.value)

    no_tensors = tmp_path / "list.pth"
    torch.save({"epoch": 1, "history": [1, 2]}, no_tensors)
    with pytest.raises(WeightsError, match="no state dict"):
        read_state_dict(no_tensors)

    foreign = write_params(tmp_path / "other.params", {"arg:fc1_weight": np.zeros((2, 2), np.float32)}, "v2")
    with pytest.raises(WeightsError, match="fc1_weight"):
        read_state_dict(foreign)
