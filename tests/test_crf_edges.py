"""Edge cases of the dense-CRF refinement of label maps: unknown (255) pixels, the one-label shortcut, a size
mismatch, stage 3 with ``pseudo_masks.crf=false`` and the pool's largest-first order."""
from __future__ import annotations

import os
import types

import numpy as np
import pytest
import torch
from PIL import Image

from smaf.config import Config, load_config
from smaf.refine import CRFLabelRefiner, CRFParams, crf_refine_labels, crf_refine_scores, refine_folder
from smaf.refine import pool as pool_module


def _two_regions(seed: int = 0):
    """A dark background with a red block (rows 10-29, columns 20-49) in mild noise, and its true labels."""
    rng = np.random.default_rng(seed)
    image = np.full((40, 64, 3), 30, np.uint8)
    image[10:30, 20:50] = (210, 50, 50)
    image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((40, 64), np.uint8)
    truth[10:30, 20:50] = 3
    return image, truth


@pytest.mark.parametrize("num_labels", [None, 6])
def test_unknown_pixels_take_the_label_of_their_region_and_never_stay_255(num_labels):
    """255 = unknown: a uniform unary, not a label. Holes of 255 inside the block, in the background and along
    the top rows are filled from the colour they share with a region; no 255 is written."""
    image, truth = _two_regions()
    label = truth.copy()
    label[15:25, 28:40] = 255     # inside the block
    label[30:38, 2:14] = 255      # inside the background
    label[:3] = 255               # an unknown border, as VOC's
    refined = crf_refine_labels(image, label, CRFParams(), num_labels=num_labels)
    assert refined.dtype == np.uint8 and refined.shape == label.shape
    np.testing.assert_array_equal(refined, truth)


@pytest.mark.parametrize("num_labels", [None, 6])
def test_a_map_with_background_only_skips_the_crf_and_is_all_background(monkeypatch, num_labels):
    """Only background and unknown pixels, no other allowed label: zeros without building a CRF (even the 255
    pixels become 0). One allowed class more (the image's label) and the CRF runs."""
    import pydensecrf.densecrf as dcrf

    built = []
    real = dcrf.DenseCRF2D

    def counting(*args):
        built.append(args)
        return real(*args)

    monkeypatch.setattr(dcrf, "DenseCRF2D", counting)
    image, truth = _two_regions()
    label = np.zeros_like(truth)
    label[12:20, 30:44] = 255
    out = crf_refine_labels(image, label, CRFParams(), num_labels=num_labels)
    assert out.dtype == np.uint8 and not out.any() and built == []
    out = crf_refine_labels(image, label, CRFParams(), extra_labels=[3], num_labels=num_labels)
    assert built == [(64, 40, 2 if num_labels is None else 6)]
    assert set(np.unique(out)) <= {0, 3}


def test_image_and_label_of_different_sizes_are_a_value_error():
    image = np.zeros((10, 12, 3), np.uint8)
    with pytest.raises(ValueError, match=r"^image \(10, 12\) and label \(10, 13\) sizes differ$"):
        crf_refine_labels(image, np.zeros((10, 13), np.uint8))
    with pytest.raises(ValueError, match=r"^image \(10, 12\) and scores \(11, 12\) sizes differ$"):
        crf_refine_scores(image, np.full((2, 11, 12), 0.5, np.float32))
    with pytest.raises(ValueError, match="label value 7 does not fit num_labels=6"):
        crf_refine_labels(image, np.full((10, 12), 7, np.uint8), num_labels=6)


def test_stage3_with_crf_false_writes_no_crf_masks(tiny_voc, tmp_path, monkeypatch):
    from smaf.checkpoint import save_checkpoint
    from smaf.models import build_model
    from smaf.stages import gen_pm

    def no_refinement(*args, **kwargs):
        raise AssertionError("pseudo_masks.crf=false ran the CRF")

    monkeypatch.setattr(gen_pm, "refine_folder", no_refinement)
    lst = f"{tiny_voc}/ImageSets/Segmentation"
    over = [f"work_dir={tmp_path}", f"data.root={tiny_voc}", f"data.train_list={lst}/train.txt",
            f"data.infer_list={lst}/train.txt", "num_workers=0", "model.pretrained=", "inference.scales=[1.0]",
            "inference.flip=false", "pseudo_masks.overlays=0", "pseudo_masks.crf=false"]
    cfg = load_config("demo", over)
    model = build_model(Config(dict(cfg.model, head="smaf")), 5)
    cfg = load_config("demo", over + [f"pseudo_masks.checkpoint={save_checkpoint(tmp_path / 'm.pth', model)}"])
    result = gen_pm.run(cfg)
    out = tmp_path / "pseudo_masks"
    n = len((tiny_voc / "ImageSets/Segmentation/train.txt").read_text().split())
    assert len(list((out / "cam_png").glob("*.png"))) == n and result["miou"] is not None
    assert result["miou_crf"] is None and not (out / "crf_png").exists()
    assert not (out / "eval" / "crf_png.json").exists() and (out / "eval" / "cam_png.json").is_file()
    assert "dense CRF" not in (out / "log.txt").read_text()


class _RecordingContext:
    """Stands in for ``multiprocessing.get_context(...)``: a 'pool' that records the order ids are handed out
    and refines them in this process."""

    def __init__(self, order: list):
        self.order = order

    def Pool(self, workers, initializer, initargs):  # noqa: N802 (multiprocessing's name)
        order = self.order

        class _Pool:
            def __enter__(self):
                initializer(*initargs)
                return self

            def __exit__(self, *exc):
                return False

            def imap_unordered(self, fn, items, chunksize=1):
                order.extend(items)
                return map(fn, items)

        return _Pool()


def test_the_pool_hands_out_the_largest_images_first(tiny_voc, tmp_path, monkeypatch):
    """Images sorted by pixel count (read from the files here), largest first; equal sizes keep list order."""
    from smaf.data.voc import VOCLayout

    layout = VOCLayout(tiny_voc)
    ids = layout.read_list(tiny_voc / "ImageSets" / "Segmentation" / "train.txt")
    (tmp_path / "in").mkdir()
    for i in ids:
        Image.fromarray(np.where(layout.load_mask(i) == 255, 0, layout.load_mask(i)).astype(np.uint8)).save(
            tmp_path / "in" / f"{i}.png")
    area = {}
    for i in ids:
        with Image.open(layout.image_path(i)) as img:
            area[i] = img.size[0] * img.size[1]
    expected = sorted(ids, key=lambda i: -area[i])
    assert expected != ids and len(set(area.values())) > 3   # the order is not the list's: the check can fail
    order: list = []
    monkeypatch.setattr(pool_module, "mp", types.SimpleNamespace(get_context=lambda kind: _RecordingContext(order)))
    # the worker initialiser runs here: it sets OMP_NUM_THREADS and one torch thread, undone afterwards
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    threads = torch.get_num_threads()
    try:
        assert refine_folder(layout, tmp_path / "in", tmp_path / "out", ids, CRFLabelRefiner(), workers=2) == len(ids)
    finally:
        torch.set_num_threads(threads)
    assert order == expected
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.png")) == sorted(ids)
