"""VOC-layout loading: layouts, lists, labels, class names, the three datasets, their error messages, image mode
conversion, and the real Pet subset."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from smaf.data.synthetic import class_names as synthetic_class_names
from smaf.data.transforms import JointTrainTransform
from smaf.data.voc import (VOC_CLASSES, ClassificationDataset, DatasetError, InferenceDataset, SegmentationDataset,
                           VOCLayout, load_class_names, load_cls_labels, read_id_list)
from smaf.io import load_image, load_label_png, save_cam_dict


def _ids(root, split):
    return read_id_list(root / "ImageSets" / "Segmentation" / f"{split}.txt")


# --------------------------------------------------------------------------------------- lists, labels
def test_read_id_list_bare_and_two_column(tmp_path):
    bare = tmp_path / "bare.txt"
    bare.write_text("2007_000032\n\n# a comment\n2007_000039  \n")
    assert read_id_list(bare) == ["2007_000032", "2007_000039"]
    psa = tmp_path / "psa.txt"
    psa.write_text("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n"
                   "/JPEGImages/2007_000039.jpg /SegmentationClassAug/2007_000039.png\n")
    assert read_id_list(psa) == ["2007_000032", "2007_000039"]


def test_read_id_list_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_id_list(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(DatasetError, match="empty"):
        read_id_list(empty)


def test_load_cls_labels(tmp_path):
    path = tmp_path / "cls_labels.npy"
    np.save(path, {"a": np.array([1, 0, 1]), "b": [0.0, 1.0, 0.0]}, allow_pickle=True)
    labels = load_cls_labels(path)
    assert set(labels) == {"a", "b"}
    assert labels["a"].dtype == np.float32 and labels["a"].tolist() == [1, 0, 1]
    with pytest.raises(DatasetError, match="not found"):
        load_cls_labels(tmp_path / "none.npy")
    np.save(tmp_path / "array.npy", np.zeros((2, 3)))
    with pytest.raises(DatasetError, match="pickled dict"):
        load_cls_labels(tmp_path / "array.npy")


def test_load_class_names(tmp_path):
    with_bg = tmp_path / "with_bg.txt"
    with_bg.write_text("background\ncat\ndog\n")
    assert load_class_names(with_bg) == ["cat", "dog"]
    without_bg = tmp_path / "without_bg.txt"
    without_bg.write_text("cat\n\ndog\n")
    assert load_class_names(without_bg) == ["cat", "dog"]
    assert load_class_names(None) == list(VOC_CLASSES)
    assert load_class_names(tmp_path / "absent.txt") == list(VOC_CLASSES)
    assert len(VOC_CLASSES) == 20 and VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor"
    only_bg = tmp_path / "only_bg.txt"
    only_bg.write_text("background\n")
    with pytest.raises(DatasetError, match="no foreground class"):
        load_class_names(only_bg)


# ------------------------------------------------------------------------------------------- layout
def test_layout_on_synthetic_tree(tiny_voc):
    layout = VOCLayout(tiny_voc)
    assert layout.class_names == synthetic_class_names(5) and layout.num_classes == 5
    assert layout.mask_dir == tiny_voc / "SegmentationClass"
    assert layout.saliency_dir == tiny_voc / "SALImages"
    ids = layout.read_list(tiny_voc / "ImageSets" / "Segmentation" / "train.txt")
    assert len(ids) == 12 and layout.has_masks(ids)
    image = layout.load_image(ids[0])
    mask = layout.load_mask(ids[0])
    sal = layout.load_saliency(ids[0])
    assert image.dtype == np.uint8 and image.shape == (*mask.shape, 3)
    assert sal.dtype == np.float32 and sal.shape == mask.shape and 0 <= sal.min() and sal.max() <= 1
    assert layout.labels[ids[0]].shape == (5,)


def test_layout_prefers_segmentation_class_aug(tmp_path):
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationClassAug"):
        (tmp_path / sub).mkdir()
    layout = VOCLayout(tmp_path)
    assert layout.mask_dir == tmp_path / "SegmentationClassAug"
    assert layout.class_names == list(VOC_CLASSES)      # no labels.txt: the VOC default
    assert not layout.has_masks(["x"])


def test_layout_explicit_paths(tiny_voc, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("\n".join(synthetic_class_names(5)))
    layout = VOCLayout(tiny_voc, cls_labels=str(tiny_voc / "cls_labels.npy"), labels_txt=str(names),
                       saliency_dir=str(tmp_path / "sal"))
    assert layout.num_classes == 5 and layout.saliency_dir == tmp_path / "sal"


def test_missing_root_points_to_readme(tmp_path):
    with pytest.raises(DatasetError, match="dataset/README.md") as err:
        VOCLayout(tmp_path / "nowhere")
    assert "not found" in str(err.value)
    with pytest.raises(DatasetError, match="no JPEGImages"):
        VOCLayout(tmp_path)


def test_missing_list(tiny_voc, tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        VOCLayout(tiny_voc).read_list(tmp_path / "train.txt")


def test_list_ids_without_labels(tiny_voc, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("train_00000\nnot_an_id\n")
    with pytest.raises(DatasetError, match="no entry"):
        VOCLayout(tiny_voc).read_list(listing)


def test_label_vector_length_mismatch(tiny_voc, tmp_path):
    names = tmp_path / "labels.txt"
    names.write_text("background\na\nb\nc\n")          # 3 names, but the vectors have 5 entries
    layout = VOCLayout(tiny_voc, labels_txt=str(names))
    with pytest.raises(DatasetError, match="label list mismatch"):
        layout.read_list(tiny_voc / "ImageSets" / "Segmentation" / "train.txt")


def test_missing_saliency(tiny_voc, tmp_path):
    layout = VOCLayout(tiny_voc, saliency_dir=str(tmp_path / "no_saliency"))
    ids = _ids(tiny_voc, "train")
    with pytest.raises(DatasetError, match="saliency map .* not found"):
        layout.load_saliency(ids[0])
    dataset = ClassificationDataset(layout, ids, JointTrainTransform(32, resize_long=None), saliency=True)
    with pytest.raises(DatasetError, match="SALImages"):
        dataset[0]


def test_missing_mask(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(DatasetError, match="mask"):
        VOCLayout(tmp_path).load_mask("x")


# ------------------------------------------------------------------------------------------ datasets
def _soft_maps_from_masks(layout: VOCLayout, ids: list[str], out_dir) -> None:
    """Write one CAM dict per id: for each labelled class c, the map (mask == c+1) as float32 (H, W)."""
    for image_id in ids:
        mask = layout.load_mask(image_id)
        classes = np.nonzero(layout.labels[image_id])[0]
        save_cam_dict(out_dir / f"{image_id}.npy", {int(c): (mask == c + 1).astype(np.float32) for c in classes})


def test_classification_dataset(tiny_voc, tmp_path):
    layout = VOCLayout(tiny_voc)
    ids = _ids(tiny_voc, "train")[:4]
    _soft_maps_from_masks(layout, ids, tmp_path)
    crop = 48
    transform = JointTrainTransform(crop, resize_long=(40, 80), flip=True, jitter=(0.3, 0.3, 0.3, 0.1))
    dataset = ClassificationDataset(layout, ids, transform, saliency=True, soft_dir=tmp_path, full_size=32)
    assert len(dataset) == 4
    for index, image_id in enumerate(ids):
        sample = dataset[(index, 1000 + index)]
        assert sample["id"] == image_id
        assert sample["image"].shape == (3, crop, crop) and sample["image"].dtype == torch.float32
        assert sample["valid"].shape == (crop, crop)
        assert sample["saliency"].shape == (1, crop, crop)
        assert sample["soft"].shape == (5, crop, crop)
        assert sample["full"].shape == (3, 32, 32)
        labels = sample["labels"]
        assert torch.equal(labels, torch.from_numpy(layout.labels[image_id]))
        # soft maps only on the image's labelled classes, and (being masks) within [0, 1]
        assert not sample["soft"][labels == 0].any()
        assert sample["soft"].min() >= 0 and sample["soft"].max() <= 1 + 1e-6
        assert sample["params"]["orig_size"] == layout.load_image(image_id).shape[:2]
        # an (index, seed) key reproduces the sample exactly
        again = dataset[(index, 1000 + index)]
        for key in ("image", "saliency", "soft", "valid", "full"):
            assert torch.equal(sample[key], again[key])
    # saliency overlaps the fused (mask) maps: synthetic saliency is a corrupted foreground
    sample = dataset[(0, 7)]
    fg = sample["soft"].sum(0) > 0.5
    assert sample["saliency"][0][fg].mean() > sample["saliency"][0][~fg & (sample["valid"] > 0)].mean()


def test_classification_dataset_missing_fused_maps(tiny_voc, tmp_path):
    layout = VOCLayout(tiny_voc)
    ids = _ids(tiny_voc, "train")
    _soft_maps_from_masks(layout, ids[:2], tmp_path)          # the others are missing
    with pytest.raises(DatasetError, match="fused maps missing"):
        ClassificationDataset(layout, ids, JointTrainTransform(32), soft_dir=tmp_path)


def test_classification_dataset_fused_map_of_wrong_size(tiny_voc, tmp_path):
    layout = VOCLayout(tiny_voc)
    image_id = _ids(tiny_voc, "train")[0]
    save_cam_dict(tmp_path / f"{image_id}.npy", {0: np.zeros((5, 7), np.float32)})
    dataset = ClassificationDataset(layout, [image_id], JointTrainTransform(32), soft_dir=tmp_path)
    with pytest.raises(DatasetError, match="regenerate it with stage 1"):
        dataset[0]
    # right size, but a class index the dataset does not have (maps of another dataset)
    h, w = layout.load_image(image_id).shape[:2]
    save_cam_dict(tmp_path / f"{image_id}.npy", {7: np.zeros((h, w), np.float32)})
    with pytest.raises(DatasetError, match="regenerate it with stage 1"):
        dataset[0]


def test_inference_dataset_scales(tiny_voc):
    layout = VOCLayout(tiny_voc)
    ids = _ids(tiny_voc, "val")
    scales = (0.5, 1.0, 1.5)
    dataset = InferenceDataset(layout, ids, scales=scales)
    for index, image_id in enumerate(ids):
        item = dataset[index]
        h, w = item["image"].shape[:2]
        assert item["id"] == image_id and item["image"].dtype == np.uint8
        assert [tuple(x.shape) for x in item["scaled"]] == [(3, round(h * s), round(w * s)) for s in scales]
        assert torch.equal(item["labels"], torch.from_numpy(layout.labels[image_id]))


def test_segmentation_dataset(tiny_voc):
    layout = VOCLayout(tiny_voc)
    ids = _ids(tiny_voc, "val")
    dataset = SegmentationDataset(layout, ids)
    for index, image_id in enumerate(ids):
        got_id, mask = dataset[index]
        assert got_id == image_id
        np.testing.assert_array_equal(mask, load_label_png(tiny_voc / "SegmentationClass" / f"{image_id}.png"))


def test_segmentation_dataset_prefers_aug_masks(tiny_voc, tmp_path):
    """A root with both mask folders evaluates against SegmentationClassAug."""
    root = tmp_path / "root"
    shutil.copytree(tiny_voc, root)
    image_id = _ids(root, "val")[0]
    (root / "SegmentationClassAug").mkdir()
    aug = np.zeros_like(load_label_png(root / "SegmentationClass" / f"{image_id}.png"))
    Image.fromarray(aug, mode="L").save(root / "SegmentationClassAug" / f"{image_id}.png")
    _, mask = SegmentationDataset(VOCLayout(root), [image_id])[0]
    assert not mask.any()


# ------------------------------------------------------------------------------------ image modes
def _rgb_pattern() -> np.ndarray:
    rgb = np.zeros((6, 7, 3), np.uint8)
    rgb[:3] = (200, 30, 60)
    rgb[3:] = (10, 120, 250)
    return rgb


def test_load_image_palette(tmp_path):
    rgb = _rgb_pattern()
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = load_image(tmp_path / "p.png")
    assert out.shape == (6, 7, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)


def test_load_image_palette_with_transparency(tmp_path):
    img = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.info["transparency"] = 0
    img.save(tmp_path / "pt.png", transparency=0)
    out = load_image(tmp_path / "pt.png")
    assert out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [255, 255, 255]       # transparent: composited on white
    assert out[0, 1].tolist() == [0, 0, 255]


def test_load_image_rgba(tmp_path):
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., :3] = (10, 200, 30)
    rgba[:2, :, 3] = 255           # opaque top half keeps its colour
    rgba[2:, :, 3] = 0             # transparent bottom half becomes white
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    out = load_image(tmp_path / "rgba.png")
    assert out.shape == (4, 5, 3) and out.dtype == np.uint8
    assert (out[:2] == (10, 200, 30)).all() and (out[2:] == 255).all()


def test_load_image_greyscale_and_cmyk(tmp_path):
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5) * 10
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    out = load_image(tmp_path / "grey.png")
    assert out.shape == (4, 5, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)
    Image.fromarray(_rgb_pattern()).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert load_image(tmp_path / "cmyk.jpg").shape == (6, 7, 3)


def test_load_image_corrupt_and_missing(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(bad)
    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.jpg"):
        load_image(truncated)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        load_image(tmp_path / "missing.jpg")


def test_image_area_reads_the_header(tmp_path):
    from smaf.io import image_area

    path = tmp_path / "wide.jpg"
    Image.fromarray(np.zeros((30, 70, 3), np.uint8)).save(path)
    assert image_area(path) == 30 * 70 == load_image(path).shape[0] * load_image(path).shape[1]
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    assert image_area(tmp_path / "broken.jpg") == 0 and image_area(tmp_path / "missing.jpg") == 0


# -------------------------------------------------------------------------------- real Pet subset
def test_pets_layout(pets_root):
    layout = VOCLayout(pets_root)
    assert layout.class_names == ["Abyssinian", "Bengal", "american_bulldog"]
    assert layout.mask_dir == pets_root / "SegmentationClass"
    train = layout.read_list(pets_root / "ImageSets" / "Segmentation" / "train.txt")
    val = layout.read_list(pets_root / "ImageSets" / "Segmentation" / "val.txt")
    assert (len(train), len(val)) == (300, 149) and not set(train) & set(val)
    for image_id in (train + val)[::15]:
        mask = layout.load_mask(image_id)
        present = {int(v) - 1 for v in np.unique(mask) if 0 < v < 255}
        assert present == set(np.nonzero(layout.labels[image_id])[0].tolist()), image_id
        assert layout.labels[image_id].sum() == 1                  # one breed per image
        assert mask.shape == layout.load_image(image_id).shape[:2], image_id


def test_pets_images_load_as_rgb(pets_root):
    """Every non-RGB file of the set (its README mentions a palette and an RGBA image) loads as RGB; the
    header scan is cheap, so all files are checked, and a few RGB ones are decoded as a control."""
    layout = VOCLayout(pets_root)
    paths = sorted(layout.image_dir.iterdir())
    odd = []
    for path in paths:
        with Image.open(path) as img:
            if img.mode != "RGB":
                odd.append((path, img.mode))
    for path, _mode in odd + [(p, "RGB") for p in paths[::100]]:
        image = load_image(path)
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8, path
        mask = load_label_png(pets_root / "SegmentationClass" / f"{path.stem}.png")
        assert mask.shape == image.shape[:2], path
