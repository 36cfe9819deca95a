"""The dataset layout checker and label rebuilder (``python -m smaf.data.prepare``) on tiny trees."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from smaf.data.prepare import check_layout, inspect_layout, main, rebuild_labels
from smaf.data.voc import load_cls_labels
from smaf.io import load_label_png, save_label_png

CLASS_NAMES = ["cat", "dog", "bird"]
H, W = 24, 32
# id -> foreground classes (0-based) drawn in its mask
TREE = {"im_a": [0], "im_b": [1], "im_c": [0, 2], "im_d": [], "im_e": [1, 2]}


def _mask(classes: list[int]) -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    for k, c in enumerate(classes):
        mask[2 + 6 * k: 8 + 6 * k, 3:20] = c + 1
    mask[0, :] = 255  # an ignore border, as in VOC
    return mask


def make_tree(root: Path) -> Path:
    """A consistent VOC-layout root: 5 JPEGs, masks, labels.txt, cls_labels.npy, two lists, saliency."""
    rng = np.random.default_rng(0)
    image_dir, saliency_dir = _mkdir(root / "JPEGImages"), _mkdir(root / "SALImages")
    labels = {}
    for image_id, classes in TREE.items():
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(image_dir / f"{image_id}.jpg")
        save_label_png(root / "SegmentationClass" / f"{image_id}.png", _mask(classes))
        Image.fromarray(np.full((H, W), 128, np.uint8)).save(saliency_dir / f"{image_id}.png")
        vec = np.zeros(len(CLASS_NAMES), np.float32)
        vec[classes] = 1
        labels[image_id] = vec
    np.save(root / "cls_labels.npy", labels, allow_pickle=True)
    (root / "labels.txt").write_text("background\n" + "\n".join(CLASS_NAMES) + "\n")
    lists = _mkdir(root / "ImageSets" / "Segmentation")
    (lists / "train.txt").write_text("im_a\nim_b\nim_c\n")
    (lists / "val.txt").write_text("/JPEGImages/im_d.jpg /SegmentationClass/im_d.png\nim_e\n")
    return root


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(_mkdir(tmp_path / "root"))


def _edit_labels(root: Path, edit) -> None:
    labels = np.load(root / "cls_labels.npy", allow_pickle=True).item()
    edit(labels)
    np.save(root / "cls_labels.npy", labels, allow_pickle=True)


def test_clean_tree_is_ok(tree, capsys):
    report = inspect_layout(tree)
    assert report.defects == []
    assert report.counts == {"images": 5, "lists": {"train.txt": 3, "val.txt": 2}, "masks": 5, "labels": 5,
                             "num_classes": 3}
    assert main(["--root", str(tree)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("layout OK: 5 images") and "5 images decoded" in out


# Each case: (kind expected, a function that breaks the tree, the id or file named, every kind reported).
def _ghost_id(root):
    with open(root / "ImageSets" / "Segmentation" / "train.txt", "a") as fh:
        fh.write("ghost\n")


def _corrupt_image(root):
    (root / "JPEGImages" / "im_b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")


def _truncated_image(root):
    data = (root / "JPEGImages" / "im_c.jpg").read_bytes()
    (root / "JPEGImages" / "im_c.jpg").write_bytes(data[:len(data) // 3])


def _colour_mask(root):
    Image.new("RGB", (W, H), (128, 0, 0)).save(root / "SegmentationClass" / "im_a.png")


def _mask_value(root):
    mask = _mask(TREE["im_c"])
    mask[10, 10] = 7
    save_label_png(root / "SegmentationClass" / "im_c.png", mask)


def _mask_size(root):
    mask = np.pad(_mask(TREE["im_e"]), ((0, 1), (0, 0)))  # same classes, one row too many
    save_label_png(root / "SegmentationClass" / "im_e.png", mask)


def _mask_extra_class(root):
    mask = _mask(TREE["im_a"])
    mask[20:23, 20:25] = 2  # dog, not in im_a's label
    save_label_png(root / "SegmentationClass" / "im_a.png", mask)


def _label_extra_class(root):
    def edit(labels):
        labels["im_b"][2] = 1  # bird, absent from im_b's mask
    _edit_labels(root, edit)


def _label_length(root):
    def edit(labels):
        labels["im_d"] = np.zeros(4, np.float32)
    _edit_labels(root, edit)


def _label_missing_id(root):
    _edit_labels(root, lambda labels: labels.pop("im_e"))


CASES = [
    ("images_dir_missing", lambda r: shutil.rmtree(r / "JPEGImages"), "JPEGImages", {"images_dir_missing"}),
    ("no_split_lists", lambda r: shutil.rmtree(r / "ImageSets"), "ImageSets", {"no_split_lists"}),
    ("list_unreadable", lambda r: (r / "extra.txt").write_text("\n"), "extra.txt", {"list_unreadable"}),
    ("ids_without_image", _ghost_id, "ghost", {"ids_without_image", "ids_without_labels", "saliency_missing"}),
    ("unreadable_images", _corrupt_image, "im_b", {"unreadable_images"}),
    ("unreadable_images", _truncated_image, "im_c", {"unreadable_images"}),
    ("class_names", lambda r: (r / "labels.txt").write_text("background\n"), "labels.txt", {"class_names"}),
    ("labels_missing", lambda r: (r / "cls_labels.npy").unlink(), "cls_labels.npy", {"labels_missing"}),
    ("labels_unreadable", lambda r: np.save(r / "cls_labels.npy", np.zeros(3)), "cls_labels.npy",
     {"labels_unreadable"}),
    ("ids_without_labels", _label_missing_id, "im_e", {"ids_without_labels"}),
    ("label_length", _label_length, "im_d", {"label_length"}),
    ("unreadable_masks", _colour_mask, "im_a", {"unreadable_masks"}),
    ("mask_values", _mask_value, "im_c", {"mask_values"}),
    ("mask_size", _mask_size, "im_e", {"mask_size"}),
    ("mask_class_not_labelled", _mask_extra_class, "im_a", {"mask_class_not_labelled"}),
    ("labelled_not_in_mask", _label_extra_class, "im_b", {"labelled_not_in_mask"}),
    ("saliency_missing", lambda r: (r / "SALImages" / "im_d.png").unlink(), "im_d", {"saliency_missing"}),
]


@pytest.mark.parametrize("kind, breaker, named, all_kinds", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_defect_kind_is_reported(tree, kind, breaker, named, all_kinds):
    breaker(tree)
    defects = check_layout(tree)
    assert {d.kind for d in defects} == all_kinds, [str(d) for d in defects]
    defect = next(d for d in defects if d.kind == kind)
    assert named in defect.message and "\n" not in defect.message
    if kind in ("ids_without_image", "unreadable_images", "ids_without_labels", "label_length",
                "unreadable_masks", "mask_values", "mask_size", "mask_class_not_labelled",
                "labelled_not_in_mask", "saliency_missing"):
        assert defect.ids == [named]


def test_missing_root_and_missing_given_list(tmp_path, tree):
    assert [d.kind for d in check_layout(tmp_path / "nowhere")] == ["root_missing"]
    defects = check_layout(tree, lists=[tmp_path / "no_such_list.txt"])
    assert [d.kind for d in defects] == ["list_unreadable"] and "no_such_list.txt" in defects[0].message


def test_class_details_and_cli_lines(tree, capsys):
    _mask_extra_class(tree)
    _label_extra_class(tree)
    _ghost_id(tree)
    defects = check_layout(tree)
    by_kind = {d.kind: d for d in defects}
    assert "im_a (+dog)" in by_kind["mask_class_not_labelled"].message
    assert "im_b (-bird)" in by_kind["labelled_not_in_mask"].message
    assert "train.txt: 1" in by_kind["ids_without_image"].message
    assert main(["--root", str(tree)]) == 1
    out = capsys.readouterr().out.splitlines()
    defect_lines = [ln for ln in out if ln.startswith("defect ")]
    assert len(defect_lines) == len(defects) == 5  # one line per kind (+ ids_without_labels, saliency_missing)


def test_image_decoding_can_be_skipped(tree):
    _corrupt_image(tree)
    report = inspect_layout(tree, check_images=False)
    assert report.defects == [] and any("decoding skipped" in line for line in report.info)
    assert [d.kind for d in check_layout(tree, check_images=True)] == ["unreadable_images"]


def test_rebuild_labels_agrees_with_masks(tree, capsys):
    def edit(labels):
        labels["im_a"][:] = [0, 1, 0]          # wrong class
        labels["im_c"] = np.zeros(4, np.float32)  # wrong length
        labels.pop("im_e")                     # missing
        labels["no_mask"] = np.array([0, 0, 1], np.float32)  # no mask: must be kept
    _edit_labels(tree, edit)
    assert {d.kind for d in check_layout(tree)} >= {"mask_class_not_labelled", "label_length", "ids_without_labels"}

    assert main(["--root", str(tree), "--rebuild-labels"]) == 0
    out = capsys.readouterr().out
    assert "1 added, 2 changed, 2 unchanged, 1 kept (no mask)" in out
    assert "im_a (+cat -dog)" in out and "layout OK" in out
    labels = load_cls_labels(tree / "cls_labels.npy")
    for image_id in TREE:
        mask = load_label_png(tree / "SegmentationClass" / f"{image_id}.png")
        expected = np.array([(mask == c + 1).any() for c in range(3)], np.float32)
        np.testing.assert_array_equal(labels[image_id], expected)
    np.testing.assert_array_equal(labels["no_mask"], [0, 0, 1])
    assert not list(tree.glob(".cls_labels.npy.*"))  # no temp file left behind


def test_rebuild_labels_to_another_file(tree, tmp_path):
    _label_extra_class(tree)
    before = (tree / "cls_labels.npy").read_bytes()
    result = rebuild_labels(tree, out=tmp_path / "rebuilt.npy")
    assert result.changed == ["im_b (-bird)"] and result.unchanged == 4 and result.kept == 0
    assert (tree / "cls_labels.npy").read_bytes() == before
    assert check_layout(tree, cls_labels=tmp_path / "rebuilt.npy") == []


def test_synthetic_demo_root_is_clean(tiny_voc):
    """The project's synthetic VOC-layout generator produces a root the checker accepts."""
    report = inspect_layout(tiny_voc)
    assert report.defects == [], [str(d) for d in report.defects]
    assert report.counts["num_classes"] == 5 and report.counts["masks"] == 18
