"""The synthetic demo dataset: deterministic, complete VOC layout, multi-label, multi-scale objects, and a
saliency map that follows the mask without copying it."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from smaf.data.synthetic import MANIFEST, _ignore_band, class_names, main, make_synthetic_dataset, render_sample
from smaf.data.voc import VOCLayout, read_id_list
from smaf.io import load_image, load_label_png

SMALL = dict(num_train=4, num_val=2, min_size=64, max_size=96)


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def spread_set(tmp_path_factory):
    """30 + 6 images at the default sizes: enough objects to see the size and saliency statistics."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("spread") / "voc", num_train=30, num_val=6, seed=3)


def _all_ids(root):
    lists = root / "ImageSets" / "Segmentation"
    return read_id_list(lists / "train.txt") + read_id_list(lists / "val.txt")


# ----------------------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _files(make_synthetic_dataset(tmp_path / "a", seed=1, **SMALL))
    b = _files(make_synthetic_dataset(tmp_path / "b", seed=1, **SMALL))
    c = _files(make_synthetic_dataset(tmp_path / "c", seed=2, **SMALL))
    assert a == b
    assert a.keys() == c.keys()
    differing = [k for k in a if k.parts[0] in ("JPEGImages", "SegmentationClass", "SALImages") and a[k] != c[k]]
    assert len(differing) == 3 * 6


def test_images_do_not_depend_on_split_sizes(tmp_path):
    """Image i of a split depends on (seed, split, i) only, so a larger set extends a smaller one."""
    small = make_synthetic_dataset(tmp_path / "small", num_train=2, num_val=1, seed=0, min_size=64, max_size=96)
    large = make_synthetic_dataset(tmp_path / "large", num_train=4, num_val=2, seed=0, min_size=64, max_size=96)
    for sid in ("train_00000", "train_00001", "val_00000"):
        assert (small / "JPEGImages" / f"{sid}.jpg").read_bytes() == (large / "JPEGImages" / f"{sid}.jpg").read_bytes()


def test_render_sample_deterministic_for_a_generator_seed():
    a = render_sample(np.random.default_rng(9), 70, 90)
    b = render_sample(np.random.default_rng(9), 70, 90)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    image, mask, sal = a
    assert image.shape == (70, 90, 3) and mask.shape == sal.shape == (70, 90)
    assert image.dtype == mask.dtype == sal.dtype == np.uint8


# ------------------------------------------------------------------------------------------- layout
def test_layout_is_complete_and_consistent(tiny_voc):
    names = class_names(5)
    assert (tiny_voc / "labels.txt").read_text().split() == ["background", *names]
    assert "synthetic" in (tiny_voc / "README.md").read_text().lower()
    labels = np.load(tiny_voc / "cls_labels.npy", allow_pickle=True).item()
    train = read_id_list(tiny_voc / "ImageSets" / "Segmentation" / "train.txt")
    val = read_id_list(tiny_voc / "ImageSets" / "Segmentation" / "val.txt")
    assert (len(train), len(val)) == (12, 6) and not set(train) & set(val)
    assert set(labels) == set(train) | set(val)
    for image_id in train + val:
        image = load_image(tiny_voc / "JPEGImages" / f"{image_id}.jpg")
        mask = load_label_png(tiny_voc / "SegmentationClass" / f"{image_id}.png")
        sal = load_image(tiny_voc / "SALImages" / f"{image_id}.png")
        h, w = mask.shape
        assert 64 <= h <= 96 and 64 <= w <= 96
        assert image.shape == (h, w, 3) and sal.shape == (h, w, 3)
        values = set(np.unique(mask).tolist())
        assert values <= set(range(len(names) + 1)) | {255}
        vec = labels[image_id]
        assert vec.dtype == np.float32 and vec.shape == (len(names),) and set(np.unique(vec)) <= {0.0, 1.0}
        assert {int(v) - 1 for v in values if 0 < v < 255} == set(np.nonzero(vec)[0].tolist()), image_id
        assert vec.sum() >= 1 and 0 in values                        # every image has an object and background
    # the loaders read it like VOC
    layout = VOCLayout(tiny_voc)
    assert layout.class_names == names and layout.has_masks(train + val)


def test_ignore_band_sits_on_borders(tiny_voc):
    """255 marks a thin band between labels: every band pixel lies within 2 px of a labelled pixel."""
    for image_id in read_id_list(tiny_voc / "ImageSets" / "Segmentation" / "train.txt"):
        mask = load_label_png(tiny_voc / "SegmentationClass" / f"{image_id}.png")
        band = mask == 255
        assert band.any()
        labelled = (~band).astype(np.uint8)
        near_labelled = cv2.dilate(labelled, np.ones((5, 5), np.uint8)) > 0
        assert near_labelled[band].all(), image_id


def test_ignore_band_keeps_thin_objects():
    """A 2 px wide object would vanish in the band; it keeps its label instead, next to a normal object."""
    label = np.zeros((20, 20), np.uint8)
    owner = np.full((20, 20), -1, np.int16)
    label[5:7, 2:18], owner[5:7, 2:18] = 3, 0          # thin bar of class 2
    label[10:18, 4:12], owner[10:18, 4:12] = 1, 1      # 8x8 square of class 0
    out = _ignore_band(label, owner)
    assert (out[5:7, 2:18] == 3).all()
    assert (out[12:16, 6:10] == 1).all() and (out[10, 4:12] == 255).all() and (out[9, 4:12] == 255).all()
    assert (out[0:3] == 0).all()


def test_multi_label_images_exist(tiny_voc):
    labels = np.load(tiny_voc / "cls_labels.npy", allow_pickle=True).item()
    counts = np.array([v.sum() for v in labels.values()])
    assert (counts >= 2).any() and (counts == 1).any()
    assert (np.stack(list(labels.values())).sum(0) > 0).all(), "every class appears somewhere"


def test_object_sizes_spread_from_small_to_large(spread_set):
    """Fraction of the image area covered by individual objects (connected components of one class, the
    border band counted with the object it surrounds)."""
    fractions = []
    for image_id in _all_ids(spread_set):
        mask = load_label_png(spread_set / "SegmentationClass" / f"{image_id}.png")
        for c in set(np.unique(mask).tolist()) - {0, 255}:
            interior = (mask == c).astype(np.uint8)
            # grow by the band so an object's area is counted up to its drawn outline
            grown = cv2.dilate(interior, np.ones((3, 3), np.uint8)) & ((mask == c) | (mask == 255))
            n, comp, stats, _ = cv2.connectedComponentsWithStats(grown.astype(np.uint8), connectivity=8)
            fractions += [stats[k, cv2.CC_STAT_AREA] / mask.size for k in range(1, n)]
    fractions = np.array(fractions)
    assert fractions.min() < 0.01, "small objects (~8% of the side) should exist"
    assert fractions.max() > 0.15, "large objects (~60% of the side) should exist"
    assert np.mean(fractions < 0.02) > 0.1 and np.mean(fractions > 0.08) > 0.1


def test_saliency_follows_mask_but_is_not_the_mask(spread_set):
    fg_all, sal_all = [], []
    misses = false_positives = 0
    for image_id in _all_ids(spread_set):
        mask = load_label_png(spread_set / "SegmentationClass" / f"{image_id}.png")
        sal = load_image(spread_set / "SALImages" / f"{image_id}.png")[..., 0].astype(np.float32) / 255
        keep = mask != 255
        fg = (mask > 0)[keep].astype(np.float32)
        fg_all.append(fg)
        sal_all.append(sal[keep])
        misses += int(np.count_nonzero((sal[keep] < 0.3) & (fg > 0)) > 20)
        false_positives += int(np.count_nonzero((sal[keep] > 0.5) & (fg == 0)) > 20)
    fg, sal = np.concatenate(fg_all), np.concatenate(sal_all)
    corr = np.corrcoef(fg, sal)[0, 1]
    assert 0.6 < corr < 0.98, corr
    assert np.abs(sal - fg).mean() > 0.03                           # noisy and blurred, not a copy
    assert misses >= 3 and false_positives >= 3, (misses, false_positives)


def test_colour_family_per_class(spread_set):
    """The median hue of each class's pixels sits near that class's hue (colour is informative)."""
    from smaf.data.synthetic import CLASS_SPECS

    names = (spread_set / "labels.txt").read_text().split()[1:]   # the set's classes (default: the first 5)
    assert names == [spec.name for spec in CLASS_SPECS[:len(names)]] and len(names) == 5
    hues = {c: [] for c in range(len(names))}
    for image_id in _all_ids(spread_set)[:20]:
        mask = load_label_png(spread_set / "SegmentationClass" / f"{image_id}.png")
        image = load_image(spread_set / "JPEGImages" / f"{image_id}.jpg")
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)
        for c in set(np.unique(mask).tolist()) - {0, 255}:
            pix = hsv[mask == c]
            pix = pix[pix[:, 1] > 60]              # the saturated main tone
            hues[c - 1] += (pix[:, 0].astype(np.float32) * 360 / 256).tolist()
    # every class was met, with enough saturated pixels for a hue: none is skipped
    assert {CLASS_SPECS[c].name: len(v) for c, v in hues.items() if len(v) < 50} == {}
    checked = []
    for c, values in hues.items():
        target = np.deg2rad(CLASS_SPECS[c].hue)
        mean_angle = np.angle(np.mean(np.exp(1j * np.deg2rad(values))))
        assert abs(np.angle(np.exp(1j * (mean_angle - target)))) < np.deg2rad(25), CLASS_SPECS[c].name
        checked.append(c)
    assert checked == list(range(len(names)))


# ----------------------------------------------------------------------------------- reruns and CLI
def test_complete_set_is_skipped_and_force_rewrites(tmp_path, capsys):
    out = make_synthetic_dataset(tmp_path / "set", seed=0, **SMALL)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and manifest["args"]["num_train"] == 4
    stamp = (out / "JPEGImages" / "train_00000.jpg").stat().st_mtime_ns
    make_synthetic_dataset(out, seed=0, verbose=True, **SMALL)
    assert "skipping" in capsys.readouterr().out
    assert (out / "JPEGImages" / "train_00000.jpg").stat().st_mtime_ns == stamp
    make_synthetic_dataset(out, seed=0, force=True, verbose=True, **SMALL)
    assert "wrote 4 train + 2 val" in capsys.readouterr().out
    # an incomplete set (a file deleted) is regenerated
    (out / "SALImages" / "val_00001.png").unlink()
    make_synthetic_dataset(out, seed=0, **SMALL)
    assert (out / "SALImages" / "val_00001.png").is_file()


def test_rerun_with_fewer_images_leaves_no_strays(tmp_path):
    out = make_synthetic_dataset(tmp_path / "set", seed=0, **SMALL)
    make_synthetic_dataset(out, num_train=2, num_val=1, seed=0, min_size=64, max_size=96)
    assert sorted(p.name for p in (out / "JPEGImages").iterdir()) == ["train_00000.jpg", "train_00001.jpg",
                                                                      "val_00000.jpg"]


def test_refuses_a_folder_that_is_not_a_synthetic_set(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a synthetic set"):
        make_synthetic_dataset(tmp_path, seed=0, **SMALL)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_dataset(tmp_path / "x", num_classes=9)
    with pytest.raises(ValueError, match="num_val"):
        make_synthetic_dataset(tmp_path / "x", num_val=0)
    with pytest.raises(ValueError, match="min_size"):
        make_synthetic_dataset(tmp_path / "x", min_size=100, max_size=50)


def test_cli(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--train", "3", "--val", "1", "--size", "64-80", "--seed", "4",
                 "--num-classes", "6"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 train + 1 val" in printed and "SYNTHETIC" in printed
    assert (out / "labels.txt").read_text().split()[-1] == "star"
    sizes = [load_label_png(p).shape for p in (out / "SegmentationClass").iterdir()]
    assert all(64 <= s <= 80 for hw in sizes for s in hw)
    assert main(["--out", str(out), "--train", "3", "--val", "1", "--size", "64x80", "--seed", "4",
                 "--num-classes", "6"]) == 0
    assert "skipping" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--size", "big"])
