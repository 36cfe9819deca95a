"""The flags of ``python -m smaf.data.prepare`` (smaf/data/prepare.py ``main``) and its image-decoding limit, on a
3-image tree written here (tests/test_prepare.py covers the defect kinds and the default invocation)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from smaf.data import prepare
from smaf.data.prepare import main
from smaf.data.voc import load_cls_labels
from smaf.io import save_label_png

H, W = 16, 20
IDS = {"p1": [0], "p2": [1], "p3": [0, 1]}     # id -> foreground classes in its mask (2 classes: cat, dog)


def _label(classes) -> np.ndarray:
    vec = np.zeros(2, np.float32)
    vec[classes] = 1
    return vec


@pytest.fixture
def root(tmp_path):
    """JPEGImages, SegmentationClass, SALImages, labels.txt, cls_labels.npy and ImageSets/Segmentation/train.txt,
    all consistent."""
    root = tmp_path / "root"
    rng = np.random.default_rng(1)
    for d in ("JPEGImages", "SALImages", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True)
    for image_id, classes in IDS.items():
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg")
        mask = np.zeros((H, W), np.uint8)
        for k, c in enumerate(classes):
            mask[2 + 5 * k: 6 + 5 * k, 2:12] = c + 1
        save_label_png(root / "SegmentationClass" / f"{image_id}.png", mask)
        Image.fromarray(np.full((H, W), 200, np.uint8)).save(root / "SALImages" / f"{image_id}.png")
    (root / "labels.txt").write_text("background\ncat\ndog\n")
    np.save(root / "cls_labels.npy", {i: _label(c) for i, c in IDS.items()}, allow_pickle=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("p1\np2\n")
    return root


def run(capsys, *argv) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().out.splitlines()


def _corrupt(root, image_id="p3"):
    (root / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")


def test_the_clean_tree_passes(root, capsys):
    code, out = run(capsys, "--root", root)
    assert code == 0
    assert out == ["layout OK: 3 images; lists train.txt (2); C=2 classes from "
                   f"'{root / 'labels.txt'}'; 3 image-level labels; 3 masks in SegmentationClass/; 2 images decoded; "
                   "saliency maps in SALImages/"]


def test_list_adds_a_split_list_from_anywhere(root, tmp_path, capsys):
    extra = tmp_path / "elsewhere" / "val.txt"
    extra.parent.mkdir()
    extra.write_text("p3\n")
    _corrupt(root)                                    # p3 is in no list of the root: only --list reaches it
    assert run(capsys, "--root", root)[0] == 0
    code, out = run(capsys, "--root", root, "--list", extra, "--list", tmp_path / "missing.txt")
    assert code == 1
    defects = [line for line in out if line.startswith("defect ")]
    assert [d.split(":")[0] for d in defects] == ["defect list_unreadable", "defect unreadable_images"]
    assert "missing.txt" in defects[0] and "p3.jpg" in defects[1]


def test_cls_labels_and_labels_txt_point_at_other_files(root, tmp_path, capsys):
    labels = tmp_path / "meta" / "labels.npy"
    labels.parent.mkdir()
    (root / "cls_labels.npy").rename(labels)
    code, out = run(capsys, "--root", root)
    assert code == 1 and out[0].startswith("defect labels_missing:")
    assert run(capsys, "--root", root, "--cls-labels", labels)[0] == 0

    names = tmp_path / "meta" / "names.txt"
    names.write_text("background\ncat\ndog\nbird\n")           # C=3: the 2-long label vectors no longer fit
    code, out = run(capsys, "--root", root, "--cls-labels", labels, "--labels-txt", names)
    assert code == 1 and out[0].startswith("defect label_length: 3 label vectors")
    assert f"C=3 classes from '{names}'" in out[-2]


def test_saliency_dir_relative_or_absolute(root, tmp_path, capsys):
    (root / "SALImages").rename(root / "Sal2")
    code, out = run(capsys, "--root", root)
    assert code == 0 and out[0].endswith("; no saliency folder")     # the default folder is checked only if present
    code, out = run(capsys, "--root", root, "--saliency-dir", "Sal2")
    assert code == 0 and out[0].endswith("; saliency maps in Sal2/")
    (root / "Sal2" / "p2.png").unlink()
    code, out = run(capsys, "--root", root, "--saliency-dir", root / "Sal2")
    assert code == 1 and out[0].startswith(f"defect saliency_missing: 1 ids have no saliency map in '{root / 'Sal2'}'")
    assert "(first: p2)" in out[0]


def test_check_images_flags_force_or_skip_decoding(root, capsys):
    _corrupt(root, "p2")
    code, out = run(capsys, "--root", root, "--no-check-images")
    assert code == 0 and "image decoding skipped for 2 images (pass --check-images to force it)" in out[0]
    code, out = run(capsys, "--root", root, "--check-images", "--workers", "1")
    assert code == 1 and out[0].startswith("defect unreadable_images: 1 images fail to decode (first: p2.jpg)")


@pytest.mark.parametrize("limit, decoded", [(1, False), (2, True)])
def test_images_are_decoded_by_default_up_to_the_limit(root, capsys, monkeypatch, limit, decoded):
    """2 images in the lists: decoded when the limit is 2 (at most the limit), skipped with a note when it is 1;
    --check-images decodes above the limit."""
    _corrupt(root, "p1")
    monkeypatch.setattr(prepare, "AUTO_DECODE_LIMIT", limit)
    code, out = run(capsys, "--root", root)
    if decoded:
        assert code == 1 and out[0].startswith("defect unreadable_images:")
    else:
        assert code == 0 and "image decoding skipped for 2 images" in out[0]
    assert run(capsys, "--root", root, "--check-images")[0] == 1


def test_the_decode_limit_is_the_documented_5000_images():
    """The default limit the module docstring and the --check-images help state."""
    assert prepare.AUTO_DECODE_LIMIT == 5000 and "(5000)" in prepare.__doc__


def test_rebuild_labels_to_labels_out_leaves_the_root_labels(root, tmp_path, capsys):
    labels = load_cls_labels(root / "cls_labels.npy")
    labels["p1"] = _label([1])                                     # wrong: p1's mask shows a cat
    np.save(root / "cls_labels.npy", labels, allow_pickle=True)
    before = (root / "cls_labels.npy").read_bytes()
    out_file = tmp_path / "rebuilt" / "cls.npy"
    code, out = run(capsys, "--root", root, "--rebuild-labels", "--labels-out", out_file)
    assert code == 0
    assert out[0] == (f"rebuilt image-level labels from 3 masks -> '{out_file}': 0 added, 1 changed, 2 unchanged, "
                      f"0 kept (no mask)")
    assert out[1] == "  changed: p1 (+cat -dog)" and out[-1].startswith("layout OK")   # the new file was checked
    assert (root / "cls_labels.npy").read_bytes() == before
    rebuilt = load_cls_labels(out_file)
    assert {k: v.tolist() for k, v in rebuilt.items()} == {"p1": [1, 0], "p2": [0, 1], "p3": [1, 1]}


def test_rebuild_labels_without_a_root_or_masks_is_one_error_line(root, tmp_path, capsys):
    code = main(["--root", str(tmp_path / "nowhere"), "--rebuild-labels"])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: dataset root '{tmp_path / 'nowhere'}' does not exist: fix --root\n"
    shutil.rmtree(root / "SegmentationClass")
    code = main(["--root", str(root), "--rebuild-labels"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "has no SegmentationClassAug/ or SegmentationClass/" in err
    assert err.count("\n") == 1


def test_root_is_required_and_bad_flag_values_are_usage_errors(capsys):
    for argv in ([], ["--root", "x", "--workers", "many"], ["--root", "x", "--no-such-flag"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
    assert "--root" in capsys.readouterr().err
