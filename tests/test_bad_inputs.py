"""Issue 20, item 2: bad inputs a new user gives end in one line naming the file or key and the fix (or are
handled correctly), and the stages check their inputs before they write anything.

The corpus is built here from the session's tiny synthetic set (copied where a test breaks something), with
DataLoader workers where the row was about workers.
"""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from smaf.checkpoint import CheckpointError, load_model, save_checkpoint
from smaf.config import Config, ConfigError, load_config
from smaf.data.voc import DatasetError, VOCLayout
from smaf.io import atomic_save, load_label_png, save_cam_dict, save_label_png
from smaf.runtime import error_message


def lean_cfg(root, work_dir, *extra):
    """The smallest run of every stage on the tiny set: random-init EfficientNet-Lite0, 32-pixel crops, batch
    2, single scale, no overlays, in-process loading (``num_workers=0``) unless overridden."""
    lst = f"{root}/ImageSets/Segmentation"
    return load_config("demo", [
        f"work_dir={work_dir}", f"data.root={root}", f"data.train_list={lst}/train.txt",
        f"data.infer_list={lst}/train.txt", f"data.val_list={lst}/val.txt", "num_workers=0", "model.pretrained=",
        "train_cls.crop=32", "train_cls.resize_long=[32,48]", "train_cls.batch_size=2", "train_cls.iterations=2",
        "train_cls.ckpt_every=1", "train_cls.val_every=0", "train_cls.val_max_images=2", "train_cls.log_every=1",
        "train_fusion.crop=32", "train_fusion.resize_long=[32,48]", "train_fusion.batch_size=2",
        "train_fusion.iterations=2", "train_fusion.ckpt_every=1", "train_fusion.val_every=0",
        "train_fusion.val_max_images=2", "train_fusion.log_every=1", "inference.scales=[1.0]",
        "inference.flip=false", "fusion.overlays=0", "pseudo_masks.overlays=0", "crf.overlays=0", "crf.workers=1",
        *extra])


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these runs are tiny, and on shared cores OpenMP barriers make two threads slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def copy_voc(tiny_voc: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny set, for tests that break part of it."""
    return Path(shutil.copytree(tiny_voc, tmp_path / "voc"))


def ids_of(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def model_checkpoint(path: Path, cfg, num_classes: int, head: str = "smaf") -> Path:
    """A smaf checkpoint of the config's network for ``num_classes`` classes (random weights)."""
    from smaf.models import build_model

    model = build_model(Config(dict(cfg.model, head=head, pretrained="")), num_classes)
    return save_checkpoint(path, model, iteration=0)


def one_line(err) -> str:
    text = error_message(err)
    assert "\n" not in text and "Traceback" not in text
    return text


# ------------------------------------------------------------------------------- images and workers
def test_a_listed_id_without_image_fails_before_anything_is_written(tiny_voc, tmp_path):
    root = copy_voc(tiny_voc, tmp_path)
    victim = ids_of(root, "train")[3]
    (root / "JPEGImages" / f"{victim}.jpg").unlink()
    work = tmp_path / "work"
    from smaf.stages import gen_fusion, train_cls

    for run in (train_cls.run, gen_fusion.run):
        with pytest.raises(DatasetError) as info:
            run(lean_cfg(root, work))
        text = one_line(info.value)
        assert victim in text and "no image" in text and "smaf.data.prepare" in text
    assert not work.exists()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def test_a_truncated_image_in_a_loader_worker_names_the_file(tiny_voc, tmp_path, capsys):
    """With DataLoader workers the error used to be 'Caught FileNotFoundError in DataLoader worker process 1.'
    (file name lost in a traceback); now the stage's one line names the file."""
    from smaf.stages import gen_fusion, train_cls

    root = copy_voc(tiny_voc, tmp_path)
    train = ids_of(root, "train")
    victim = root / "JPEGImages" / f"{train[0]}.jpg"
    _truncate(victim)
    (root / "two.txt").write_text(f"{train[0]}\n{train[1]}\n")
    overrides = ["--config", "demo", *[f"{k}={v}" for k, v in {
        "work_dir": tmp_path / "work", "data.root": root, "data.train_list": root / "two.txt",
        "data.infer_list": root / "two.txt", "data.val_list": root / "two.txt", "num_workers": 2,
        "model.pretrained": "", "train_cls.crop": 32, "train_cls.resize_long": "[32,48]",
        "train_cls.batch_size": 2, "train_cls.iterations": 1, "train_cls.val_every": 0,
        "inference.scales": "[1.0]", "inference.flip": "false", "fusion.overlays": 0}.items()]]
    for main in (train_cls.main, gen_fusion.main):
        if main is gen_fusion.main:
            model_checkpoint(tmp_path / "work" / "train_cls" / "final.pth", lean_cfg(root, tmp_path), 5)
        with pytest.raises(SystemExit) as info:
            main(overrides)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        line = err[-1].split("error: ", 1)[-1]   # (a progress bar may share the line)
        assert "error: " in err[-1] and str(victim) in line and "truncated" in line
        assert "Caught" not in line and "Traceback" not in "\n".join(err)


def test_worker_error_message_keeps_the_original_line():
    text = ("Caught ValueError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 3, in f\n    raise ValueError(msg)\n'
            "ValueError: /data/JPEGImages/a.jpg: corrupt or unreadable image (truncated); replace it\n")
    assert error_message(ValueError(text)) == ("/data/JPEGImages/a.jpg: corrupt or unreadable image (truncated); "
                                               "replace it (in DataLoader worker process 1)")
    assert error_message(ValueError("plain\nmessage")) == "plain message"


# ----------------------------------------------------------------------------- checkpoints vs dataset
def test_checkpoints_for_another_class_count_fail_before_anything_is_written(tiny_voc, tmp_path):
    from smaf.stages import gen_fusion, gen_pm, train_cls

    work = tmp_path / "work"
    cfg = lean_cfg(tiny_voc, work)
    other = model_checkpoint(tmp_path / "three_classes.pth", cfg, 3)
    cases = [(gen_fusion.run, f"fusion.checkpoint={other}", "fusion.checkpoint", "fusion"),
             (gen_pm.run, f"pseudo_masks.checkpoint={other}", "pseudo_masks.checkpoint", "pseudo_masks"),
             (train_cls.run, f"train_cls.resume={other}", "train_cls.resume", "train_cls")]
    for run, override, key, folder in cases:
        with pytest.raises(CheckpointError) as info:
            run(lean_cfg(tiny_voc, work, override))
        text = one_line(info.value)
        assert key in text and "3 classes" in text and "has 5" in text and str(other) in text
        assert not (work / folder).exists()


def test_auto_resume_from_a_checkpoint_that_does_not_fit_is_one_line(tiny_voc, tmp_path):
    from smaf.stages import train_cls

    work = tmp_path / "work"
    cfg = lean_cfg(tiny_voc, work)
    model_checkpoint(work / "train_cls" / "checkpoints" / "iter_0000001.pth", cfg, 3)
    with pytest.raises(CheckpointError) as info:
        train_cls.run(cfg)
    text = one_line(info.value)
    assert "iter_0000001.pth" in text and ("not a training checkpoint" in text or "does not fit" in text)


def test_resume_from_a_final_model_says_what_resume_needs(tiny_voc, tmp_path):
    from smaf.stages import train_cls

    work = tmp_path / "work"
    final = model_checkpoint(tmp_path / "final.pth", lean_cfg(tiny_voc, work), 5)
    with pytest.raises(CheckpointError) as info:
        train_cls.run(lean_cfg(tiny_voc, work, f"train_cls.resume={final}"))
    text = one_line(info.value)
    assert "not a training checkpoint" in text and "resume=none" in text


@pytest.mark.parametrize("meta, expected", [
    ({"backbone": "efficientnet_lite0", "head": "smaf"}, "missing num_classes, output_stride, feat_dim"),
    ({"arch": "no_such_net", "args": {}}, "cannot build"),
    ({"arch": "cam_net", "args": {"num_classes": 5, "bogus": 1}}, "cannot build"),
    ("not a dict", "expected a dict"),
])
def test_checkpoints_with_incomplete_meta_are_one_line(tmp_path, meta, expected):
    path = tmp_path / "final.pth"
    torch.save({"format": "smaf", "model": {"w": torch.zeros(1)}, "meta": meta}, path)
    with pytest.raises(CheckpointError) as info:
        load_model(path, producer="stage 0 (bash script/train_cls.sh)")
    text = one_line(info.value)
    assert expected in text and str(path) in text


@pytest.mark.parametrize("content", [b"", os.urandom(2000), b"PK\x03\x04" + os.urandom(200)])
def test_random_or_truncated_checkpoints_are_one_line(tmp_path, content):
    path = tmp_path / "final.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="unreadable") as info:
        load_model(path, producer="stage 0")
    assert str(path) in one_line(info.value) and "re-run stage 0" in str(info.value)


# ------------------------------------------------------------------------------------------- masks
def _set_mask_value(root: Path, image_id: str, value: int) -> Path:
    path = root / "SegmentationClassAug" / f"{image_id}.png"
    if not path.is_file():
        path = root / "SegmentationClass" / f"{image_id}.png"
    mask = load_label_png(path).copy()
    mask[0, 0] = value
    save_label_png(path, mask)
    return path


def test_mask_values_outside_the_classes_stop_before_training(tiny_voc, tmp_path):
    """Stage-0 validation used to ignore values outside 0..C and report a number."""
    from smaf.stages import gen_fusion, train_cls

    root = copy_voc(tiny_voc, tmp_path)
    bad = _set_mask_value(root, ids_of(root, "val")[1], 9)
    work = tmp_path / "work"
    with pytest.raises(DatasetError) as info:
        train_cls.run(lean_cfg(root, work, "train_cls.val_every=1", "train_cls.val_max_images=0"))
    text = one_line(info.value)
    assert str(bad) in text and "value 9" in text and "data.labels_txt" in text and "--labels" not in text
    assert not work.exists()
    # stage 1 scores fusion.eval_list: the same check, before anything is written
    bad_train = _set_mask_value(root, ids_of(root, "train")[2], 7)
    model_checkpoint(tmp_path / "model.pth", lean_cfg(root, work), 5)
    with pytest.raises(DatasetError) as info:
        gen_fusion.run(lean_cfg(root, work, f"fusion.checkpoint={tmp_path / 'model.pth'}"))
    assert str(bad_train) in one_line(info.value) and not (work / "fusion").exists()


def test_validator_checks_masks_it_scores(tiny_voc, tmp_path):
    """The check inside the validator too (a list changed after the stage started)."""
    import logging

    from smaf.cam.background import BackgroundRule
    from smaf.cam.validate import CAMValidator
    from smaf.models import build_model

    root = copy_voc(tiny_voc, tmp_path)
    layout = VOCLayout(root)
    val = root / "ImageSets" / "Segmentation" / "val.txt"
    validator = CAMValidator(layout, str(val), 2, BackgroundRule("fixed", 0.2), 0, "none", 0, logging.getLogger())
    _set_mask_value(root, validator.ids[0], 200)
    model = build_model(Config(dict(lean_cfg(root, tmp_path).model, head="smaf", pretrained="")), 5)
    with pytest.raises(DatasetError, match="value 200.*data.labels_txt"):
        validator(model)


def test_stage_evaluation_hint_names_the_config_key(tmp_path):
    from smaf.evaluate import evaluate_folder

    mask = np.zeros((4, 4), np.uint8)
    mask[1:3, 1:3] = 4
    save_label_png(tmp_path / "gt" / "x.png", mask)
    save_label_png(tmp_path / "pred" / "x.png", mask)
    with pytest.raises(ValueError, match="set data.labels_txt") as info:
        evaluate_folder(tmp_path / "pred", tmp_path / "gt", ["x"], ["background", "a", "b"],
                        labels_hint="set data.labels_txt")
    assert "--labels" not in str(info.value)


def test_a_mask_of_another_size_than_its_image_is_blamed_on_the_mask(tiny_voc, tmp_path, capsys):
    """A 1x1 image with a full-size mask: the error used to blame the prediction's size."""
    from smaf.evaluate import main as evaluate_main
    from smaf.stages import train_cls

    root = copy_voc(tiny_voc, tmp_path)
    victim = ids_of(root, "val")[0]
    image_path = root / "JPEGImages" / f"{victim}.jpg"
    Image.new("RGB", (1, 1), (9, 9, 9)).save(image_path)
    work = tmp_path / "work"
    with pytest.raises(DatasetError) as info:
        train_cls.run(lean_cfg(root, work, "train_cls.val_every=1"))
    text = one_line(info.value)
    assert str(image_path) in text and "is 1x1" in text and "mask" in text and not work.exists()
    # the evaluation CLI with --root knows the images too
    pred = tmp_path / "pred"
    save_label_png(pred / f"{victim}.png", np.zeros((1, 1), np.uint8))
    (tmp_path / "one.txt").write_text(victim + "\n")
    assert evaluate_main(["--pred", str(pred), "--root", str(root), "--list", str(tmp_path / "one.txt")]) == 2
    err = capsys.readouterr().err
    assert "its image" in err and "is 1x1" in err and "regenerate the prediction" not in err


# ----------------------------------------------------------------------------------- training keys
@pytest.mark.parametrize("override, key", [
    ("train_cls.iterations=0", "train_cls.iterations"), ("train_cls.log_every=0", "train_cls.log_every"),
    ("train_cls.ckpt_every=-1", "train_cls.ckpt_every"), ("train_cls.batch_size=0", "train_cls.batch_size"),
    ("train_cls.val_every=1.5", "train_cls.val_every"), ("train_cls.crop=0", "train_cls.crop"),
    ("train_cls.resize_long=[48]", "train_cls.resize_long"), ("train_cls.resize_long=[48,32]", "train_cls.resize_long"),
    ("train_cls.resize_long=[32.5,48]", "train_cls.resize_long"),
])
def test_training_keys_that_cannot_work_are_named(tiny_voc, tmp_path, override, key):
    from smaf.stages import train_cls

    with pytest.raises(ConfigError) as info:
        train_cls.run(lean_cfg(tiny_voc, tmp_path / "work", override))
    assert one_line(info.value).startswith(key) and not (tmp_path / "work").exists()


@pytest.mark.parametrize("stage", ["train_fusion", "train_aff", "train_afa"])
def test_every_training_stage_checks_its_crop_range_before_writing(tiny_voc, tmp_path, stage):
    """One shared check (engine.check_training_section) for every stage's ``resize_long``: a range of one
    value, or lo > hi, used to fail inside a loader worker (IndexError / numpy's 'low >= high')."""
    import importlib

    run = importlib.import_module(f"smaf.stages.{stage}").run
    for bad in ("[64]", "[96,64]"):
        with pytest.raises(ConfigError) as info:
            run(lean_cfg(tiny_voc, tmp_path / "work", f"{stage}.resize_long={bad}"))
        assert one_line(info.value).startswith(f"{stage}.resize_long=") and "0 < lo <= hi" in str(info.value)
    assert not (tmp_path / "work").exists()


def test_long_side_range_accepts_a_range_or_nothing():
    from smaf.data.transforms import crop_side, long_side_range

    assert long_side_range([224, 320], "k") == (224, 320) and long_side_range([64, 64], "k") == (64, 64)
    assert long_side_range([], "k") is None and long_side_range(None, "k") is None
    for bad in ([0, 10], [True, 4], "224,320", [224, 320, 400]):
        with pytest.raises(ConfigError, match=r"^k="):
            long_side_range(bad, "k")
    assert crop_side(256, "c") == 256
    for bad in (0, -1, 25.5, True):
        with pytest.raises(ConfigError, match=r"^c="):
            crop_side(bad, "c")


def test_engine_names_the_section_of_any_stage():
    from smaf.engine import check_training_section, section_name

    cfg = Config({"train_fusion": {"iterations": 0, "log_every": 1}, "other": {}})
    assert section_name(cfg, cfg.train_fusion) == "train_fusion"
    with pytest.raises(ConfigError, match=r"^train_fusion\.iterations=0"):
        check_training_section(cfg.train_fusion, "train_fusion")


def test_ckpt_every_zero_trains_without_intermediate_checkpoints(tiny_voc, tmp_path):
    from smaf.stages import train_cls

    final = train_cls.run(lean_cfg(tiny_voc, tmp_path, "train_cls.ckpt_every=0", "train_cls.iterations=2"))
    assert final.is_file()
    assert not list((tmp_path / "train_cls" / "checkpoints").glob("iter_*.pth"))
    assert "ckpt_every=0" in (tmp_path / "train_cls" / "log.txt").read_text()


# ------------------------------------------------------------------------------------ weights files
@pytest.mark.parametrize("kind", ["random", "truncated", "empty", "no_tensors"])
def test_bad_efficientnet_pretrained_files_are_one_line(tiny_voc, tmp_path, kind):
    from smaf.models import build_model
    from smaf.models.weights import WeightsError

    path = tmp_path / f"{kind}.pth"
    if kind == "random":
        path.write_bytes(os.urandom(5000))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "no_tensors":
        torch.save({"epoch": 3, "history": [1, 2]}, path)
    else:
        torch.save({"state_dict": {"w": torch.zeros(1000)}}, path)
        _truncate(path)
    model_cfg = Config(dict(lean_cfg(tiny_voc, tmp_path).model, head="smaf", pretrained=str(path)))
    with pytest.raises(WeightsError) as info:
        build_model(model_cfg, 5)
    text = one_line(info.value)
    assert str(path) in text


# ---------------------------------------------------------------------------------- CAM dicts, files
@pytest.mark.parametrize("kind", ["random", "truncated", "array_1d", "not_a_dict"])
def test_bad_cam_npy_files_are_one_line(tiny_voc, tmp_path, capsys, kind):
    from smaf.data.transforms import JointTrainTransform
    from smaf.data.voc import ClassificationDataset
    from smaf.evaluate import main as evaluate_main

    layout = VOCLayout(tiny_voc)
    image_id = ids_of(tiny_voc, "val")[0]
    pred = tmp_path / "pred"
    path = pred / f"{image_id}.npy"
    save_cam_dict(path, {0: np.zeros(layout.load_mask(image_id).shape, np.float32)})
    if kind == "random":
        path.write_bytes(os.urandom(3000))
    elif kind == "truncated":
        _truncate(path)
    elif kind == "array_1d":
        np.save(path, np.zeros(7, np.float32))
    else:
        np.save(path, ["a", "list"], allow_pickle=True)
    (tmp_path / "one.txt").write_text(image_id + "\n")
    assert evaluate_main(["--pred", str(pred), "--root", str(tiny_voc), "--list", str(tmp_path / "one.txt"),
                          "--bg", "0.2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(path) in err and len(err.splitlines()) == 1
    # stage 2 reads fused maps through the dataset (in its loader workers)
    dataset = ClassificationDataset(layout, [image_id], JointTrainTransform(32, (32, 48)), soft_dir=pred)
    with pytest.raises(ValueError) as info:
        dataset[(0, 1)]
    assert str(path) in one_line(info.value)


def test_random_prototypes_file_is_one_line(tmp_path):
    from smaf.safe_load import UnreadableFileError, torch_load

    path = tmp_path / "prototypes.pt"
    path.write_bytes(os.urandom(700))
    with pytest.raises(UnreadableFileError) as info:
        torch_load(path, "prototypes")
    assert str(path) in one_line(info.value)


def test_bad_cls_labels_are_one_line(tmp_path):
    from smaf.data.voc import load_cls_labels

    path = tmp_path / "cls_labels.npy"
    for content in (os.urandom(500), b""):
        path.write_bytes(content)
        with pytest.raises(DatasetError) as info:
            load_cls_labels(path)
        assert str(path) in one_line(info.value)
    np.save(path, {"a": "not a vector"}, allow_pickle=True)
    with pytest.raises(DatasetError, match="label vector"):
        load_cls_labels(path)


# ------------------------------------------------------------------------------- files and folders
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_outputs_follow_the_umask(tmp_path, umask):
    before = os.umask(umask)
    try:
        paths = [atomic_save(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x")),
                 save_cam_dict(tmp_path / "c.npy", {0: np.zeros((2, 2), np.float32)}),
                 save_label_png(tmp_path / "l.png", np.zeros((2, 2), np.uint8))]
        model = torch.nn.Conv2d(1, 1, 1)
        paths.append(save_checkpoint(tmp_path / "m.pth", model, meta={"arch": "x", "args": {}}))
    finally:
        os.umask(before)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_stale_temp_files_are_removed_when_a_stage_starts(tiny_voc, tmp_path):
    from smaf.runtime import prepare_output

    cfg = lean_cfg(tiny_voc, tmp_path)
    stale = [tmp_path / "train_cls" / "checkpoints" / ".iter_0000002.pth.k3x_9a2q.tmp",
             tmp_path / "train_cls" / ".final.pth.abcdefgh.tmp"]
    kept = [tmp_path / "train_cls" / ".keep", tmp_path / "train_cls" / "notes.tmp"]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    prepare_output(cfg, "train_cls")
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert "removed 2 temp file(s)" in (tmp_path / "train_cls" / "log.txt").read_text()
