"""Issue 20, item 1: no code path unpickles a user-supplied file with arbitrary globals.

Every file a user can pass (smaf checkpoints, ``*.resume``, ``model.pretrained`` for both backbones,
``cls_labels.npy``, CAM ``.npy`` dicts) is tried with a harmless payload whose ``__reduce__`` would create a
marker file: each load must be refused with one line, and the marker must not exist afterwards. The formats we
and other tools write (numpy RNG states in checkpoints, ``np.save`` of dicts under numpy 1.x and 2.x names,
numpy scalars) stay readable.
"""
from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from smaf.safe_load import (RestrictedUnpickler, UnreadableFileError, UnsafeFileError, load_npy, load_npy_object,
                            main as convert_main, restricted_loads, torch_load)

REPO_ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this creates ``marker`` (a harmless stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


class Custom:
    """A benign custom object (what the trusted converter drops)."""

    def __init__(self):
        self.value = 3


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    assert not path.exists(), "a payload ran while loading a user-supplied file"


def _evil_pth(path: Path, marker: Path, smaf: bool = True) -> Path:
    payload = {"format": "smaf", "model": {"w": torch.zeros(1)}, "meta": {"arch": "cam_net", "args": {}},
               "extras": {"x": Payload(marker)}} if smaf else {"state_dict": {"w": torch.zeros(1)}, "x": Payload(marker)}
    torch.save(payload, path)
    return path


def _evil_npy(path: Path, marker: Path, value=None) -> Path:
    obj = {0: np.zeros((2, 2), np.float32), 1: Payload(marker)} if value is None else value
    np.save(path, np.array(obj, dtype=object), allow_pickle=True)
    return path


def _one_line_refusal(err: BaseException, path: Path) -> None:
    text = str(err)
    assert "refused" in text and str(path) in text and "\n" not in text
    assert "--trust-pickle" in text


# --------------------------------------------------------------------------------- payloads refused
def test_smaf_checkpoint_with_payload_is_refused(tmp_path, marker):
    from smaf.checkpoint import CheckpointError, load_model, read_checkpoint

    path = _evil_pth(tmp_path / "final.pth", marker)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    _one_line_refusal(info.value, path)
    with pytest.raises(CheckpointError):
        load_model(path)


def test_foreign_weights_with_payload_are_refused(tmp_path, marker):
    from smaf.models.efficientnet_lite import read_efficientnet_lite0_checkpoint
    from smaf.models.resnet38d import ResNet38d
    from smaf.models.weights import WeightsError, load_weights, read_state_dict

    path = _evil_pth(tmp_path / "resnet38d_imagenet.pth", marker, smaf=False)
    for call in (lambda: read_state_dict(path), lambda: load_weights(ResNet38d(), path),
                 lambda: read_efficientnet_lite0_checkpoint(path)):
        with pytest.raises(WeightsError) as info:
            call()
        _one_line_refusal(info.value, path)


def test_model_pretrained_with_payload_fails_the_stage_in_one_line(tmp_path, marker):
    """``model.pretrained`` (the README invites checkpoints in circulation) through the model builder."""
    from smaf.config import Config
    from smaf.models import build_model
    from smaf.models.weights import WeightsError

    path = _evil_pth(tmp_path / "eps_checkpoint.pth", marker, smaf=False)
    for backbone in ("efficientnet_lite0", "resnet38d"):
        cfg = Config({"backbone": backbone, "pretrained": str(path), "output_stride": 16 if backbone != "resnet38d"
                      else 8, "feat_dim": 16, "head": "smaf"})
        with pytest.raises(WeightsError) as info:
            build_model(cfg, 3)
        _one_line_refusal(info.value, path)


def test_cls_labels_with_payload_are_refused(tmp_path, marker):
    from smaf.data.prepare import inspect_layout
    from smaf.data.voc import DatasetError, load_cls_labels

    path = _evil_npy(tmp_path / "cls_labels.npy", marker, {"a": np.ones(3, np.float32), "b": Payload(marker)})
    with pytest.raises(DatasetError) as info:
        load_cls_labels(path)
    _one_line_refusal(info.value, path)
    (tmp_path / "JPEGImages").mkdir()
    report = inspect_layout(tmp_path, cls_labels=path)
    defect = next(d for d in report.defects if d.kind == "labels_unreadable")
    assert "refused" in defect.message


def test_cam_dict_with_payload_is_refused(tmp_path, marker, capsys):
    from smaf.evaluate import main as evaluate_main
    from smaf.io import load_cam_dict, save_label_png

    (tmp_path / "pred").mkdir()
    path = _evil_npy(tmp_path / "pred" / "x.npy", marker)
    with pytest.raises(UnsafeFileError) as info:
        load_cam_dict(path)
    _one_line_refusal(info.value, path)
    save_label_png(tmp_path / "gt" / "x.png", np.zeros((2, 2), np.uint8))
    assert evaluate_main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--bg", "0.2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refused") and len(err.strip().splitlines()) == 1


def test_training_resume_with_payload_is_refused_before_anything_is_written(tiny_voc, tmp_path, marker):
    from smaf.checkpoint import CheckpointError
    from smaf.stages import train_cls
    from test_bad_inputs import lean_cfg

    path = _evil_pth(tmp_path / "iter_0000002.pth", marker)
    work = tmp_path / "work"
    with pytest.raises(CheckpointError) as info:
        train_cls.run(lean_cfg(tiny_voc, work, f"train_cls.resume={path}"))
    _one_line_refusal(info.value, path)
    assert not work.exists()


def test_stage_cli_refuses_a_payload_checkpoint(tiny_voc, tmp_path, marker):
    path = _evil_pth(tmp_path / "evil.pth", marker)
    lst = f"{tiny_voc}/ImageSets/Segmentation/train.txt"
    proc = subprocess.run([sys.executable, "-m", "smaf.stages.gen_fusion", "--config", "demo",
                           f"work_dir={tmp_path / 'work'}", f"data.root={tiny_voc}", f"data.train_list={lst}",
                           f"data.infer_list={lst}", f"fusion.checkpoint={path}"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: refused") and str(path) in last
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("name", ["builtins.eval", "os.system", "numpy.load", "subprocess.Popen",
                                  "numpy.testing._private.utils.runstring"])
def test_restricted_unpickler_refuses_other_globals(name):
    module, attr = name.rsplit(".", 1)
    data = b"\x80\x02c" + module.encode() + b"\n" + attr.encode() + b"\nq\x00."
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        restricted_loads(data)


def test_restricted_unpickler_does_not_call_ndarray_or_build_large_arrays():
    # REDUCE on numpy.ndarray itself (allocating an arbitrary array) is not possible
    call_ndarray = b"\x80\x02cnumpy\nndarray\nK\x05\x85\x85R."
    with pytest.raises(Exception):
        restricted_loads(call_ndarray)
    big = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\xe1\xf5\x05\x85C\x01b\x87R.")
    with pytest.raises(pickle.UnpicklingError):
        restricted_loads(big)


# ------------------------------------------------------------------------------- formats stay readable
def test_numpy_dicts_written_by_numpy_load(tmp_path):
    cams = {0: np.random.default_rng(0).random((5, 7), dtype=np.float32), 3: np.ones((5, 7), np.float32)}
    labels = {"2007_000032": np.array([1, 0, 1], np.float32), 2007000033: np.array([0, 1, 0], np.float32)}
    mixed = OrderedDict([(1, np.float32(0.5)), ("k", [np.int64(3), (1.0, "x")]), ("n", None),
                         ("f64", np.zeros((2, 3), np.float64)), ("b", np.array([True, False]))])
    for name, obj in (("cams", cams), ("labels", labels), ("mixed", mixed)):
        np.save(tmp_path / f"{name}.npy", obj, allow_pickle=True)
        loaded = load_npy_object(tmp_path / f"{name}.npy")
        assert list(loaded) == list(obj)
        for key in obj:
            if isinstance(obj[key], np.ndarray):
                assert loaded[key].dtype == obj[key].dtype and np.array_equal(loaded[key], obj[key])
    assert load_npy_object(tmp_path / "mixed.npy")["k"] == [3, (1.0, "x")]
    # a plain (non-pickled) array is read as np.load reads it
    np.save(tmp_path / "plain.npy", np.arange(6, dtype=np.int16).reshape(2, 3))
    assert np.array_equal(load_npy(tmp_path / "plain.npy"), np.arange(6).reshape(2, 3))


@pytest.mark.parametrize("protocol", [2, 3])
def test_numpy_1x_global_names_and_old_protocols_load(tmp_path, protocol):
    """Files written under numpy 1.x name the reconstruct function ``numpy.core.multiarray`` (np.save used
    protocol 3; Python 2 tools protocol 2, which stores bytes through ``_codecs.encode``). The current writer's
    protocol is covered by the test above."""
    obj = np.array({1: np.full((2, 3), 0.25, np.float32), 2: np.float32(7)}, dtype=object)
    raw = pickle.dumps(obj, protocol=protocol)
    old = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old != raw
    header = {"descr": "|O", "fortran_order": False, "shape": ()}
    path = tmp_path / "old.npy"
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.write(old)
    loaded = load_npy_object(path)
    assert np.array_equal(loaded[1], np.full((2, 3), 0.25, np.float32)) and loaded[2] == np.float32(7)


def test_corrupt_npy_files_are_unreadable_not_refused(tmp_path):
    np.save(tmp_path / "good.npy", {0: np.zeros((4, 4), np.float32)}, allow_pickle=True)
    data = (tmp_path / "good.npy").read_bytes()
    (tmp_path / "truncated.npy").write_bytes(data[:-30])
    (tmp_path / "random.npy").write_bytes(os.urandom(256))
    (tmp_path / "empty.npy").write_bytes(b"")
    for name in ("truncated", "random", "empty"):
        with pytest.raises(UnreadableFileError) as info:
            load_npy(tmp_path / f"{name}.npy")
        assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)


def test_training_checkpoint_rng_state_round_trips_weights_only(tmp_path):
    """What our training checkpoints hold (RNG states of torch, numpy, Python; optimiser with the poly
    schedule; scaler; extras) loads weights-only and restores the generators exactly."""
    from smaf.checkpoint import read_checkpoint, save_checkpoint
    from smaf.engine import _rng_state, _set_rng_state
    from smaf.optim import build_poly_sgd

    model = torch.nn.Conv2d(2, 3, 1)
    model.arch_spec = {"arch": "cam_net", "args": {"num_classes": 2}}
    optimizer = build_poly_sgd([[model.weight], [model.bias], [], []], lr=0.1, weight_decay=1e-4, momentum=0.9,
                               max_step=10)
    model(torch.randn(1, 2, 4, 4)).sum().backward()
    optimizer.step()
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    state = _rng_state(torch.device("cpu"))
    expected = (random.random(), np.random.random(), torch.rand(1).item())
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    path = save_checkpoint(tmp_path / "iter_0000001.pth", model, iteration=1, optimizer=optimizer.state_dict(),
                           scaler=scaler.state_dict(), extras={"prototypes": {"prototypes": torch.ones(3, 2)}},
                           rng=[state], log_window={"count": 1, "sums": {"loss": 0.5}})
    ckpt = read_checkpoint(path)
    _set_rng_state(ckpt["rng"][0], torch.device("cpu"))
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected
    fresh = build_poly_sgd([[model.weight], [model.bias], [], []], lr=0.1, weight_decay=1e-4, momentum=0.9,
                           max_step=10)
    fresh.load_state_dict(ckpt["optimizer"])
    assert fresh.state_dict()["poly_schedule"] == optimizer.state_dict()["poly_schedule"]
    assert isinstance(ckpt["rng"][0]["numpy"][1], np.ndarray) and ckpt["rng"][0]["numpy"][1].dtype == np.uint32


def test_torch_load_allows_numpy_scalars_in_foreign_checkpoints(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(2)}, "best_acc": np.float64(0.75), "epoch": 3}, tmp_path / "a.pth")
    obj = torch_load(tmp_path / "a.pth")
    assert obj["best_acc"] == 0.75 and torch.equal(obj["state_dict"]["w"], torch.ones(2))


# --------------------------------------------------------------------------------- trusted conversion
def test_converter_needs_the_explicit_switch_and_writes_a_safe_copy(tmp_path, capsys):
    src = tmp_path / "third_party.pth"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "args": Custom(), "epoch": 7}, src)
    with pytest.raises(UnsafeFileError):
        torch_load(src)
    dst = tmp_path / "third_party_safe.pth"
    assert convert_main([str(src), str(dst)]) == 2 and not dst.exists()
    assert "--trust-pickle" in capsys.readouterr().err
    assert convert_main(["--trust-pickle", str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "dropped 1" in out and "Custom" in out
    converted = torch_load(dst)
    assert converted["epoch"] == 7 and "args" not in converted
    assert torch.equal(converted["state_dict"]["w"], torch.arange(3.0))

    npy = tmp_path / "cams.npy"
    np.save(npy, np.array({0: np.ones((2, 2), np.float32), "extra": Custom()}, dtype=object), allow_pickle=True)
    assert convert_main(["--trust-pickle", str(npy), str(tmp_path / "cams_safe.npy")]) == 0
    assert list(load_npy_object(tmp_path / "cams_safe.npy")) == [0]


def test_unpickler_class_is_restricted_by_default():
    assert RestrictedUnpickler.find_class is not pickle.Unpickler.find_class
