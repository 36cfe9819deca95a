"""Stage 3 (``gen_pm``) on the tiny set with hand-made fused maps in place of the network's (the rest of the
stage is the real code path): the masks are the argmax over [background score; maps] under the configured
background rule, and a rerun redoes exactly the images whose files are missing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from smaf.cam import writer
from smaf.cam.fusion import FusedResult
from smaf.checkpoint import save_checkpoint
from smaf.config import Config, load_config
from smaf.io import load_cam_dict, load_label_png
from smaf.models import build_model
from smaf.stages import gen_pm


def hand_made_maps(classes: list, h: int, w: int) -> np.ndarray:
    """By column quarter q of the image: every map 0.1; the first class 0.25 in q1 and 0.9 in q2-q3, except
    exactly 0.2 (the fixed background score: a tie) on the top row of q2; the second class (if any) 0.95 in q3;
    further classes stay 0.1."""
    maps = np.full((len(classes), h, w), 0.1, np.float32)
    if classes:
        maps[0, :, w // 4:w // 2] = 0.25
        maps[0, :, w // 2:] = 0.9
        maps[0, 0, w // 2:3 * w // 4] = 0.2
    if len(classes) > 1:
        maps[1, :, 3 * w // 4:] = 0.95
    return maps


def expected_mask(classes: list, h: int, w: int, q1_is_foreground: bool) -> np.ndarray:
    """The VOC labels of :func:`hand_made_maps`: q0 background; q1 the first class only when its 0.25 is above
    the background score; q2 the first class but for its top row, at or below the score under both rules
    (ties go to the background); q3 the second class where there is one, else the first."""
    mask = np.zeros((h, w), np.uint8)
    if classes:
        mask[:, w // 2:] = classes[0] + 1
        mask[0, w // 2:3 * w // 4] = 0
        if q1_is_foreground:
            mask[:, w // 4:w // 2] = classes[0] + 1
    if len(classes) > 1:
        mask[:, 3 * w // 4:] = classes[1] + 1
    return mask


@pytest.fixture
def fused_by_hand(monkeypatch):
    """Replace the network's fused maps by :func:`hand_made_maps`; returns the list of ids fused."""
    fused = []

    def fake_fuse(model, scaled, labels, out_size, **kwargs):
        classes = torch.nonzero(torch.as_tensor(labels) > 0.5).flatten().tolist()
        fused.append(classes)
        return FusedResult(classes, torch.from_numpy(hand_made_maps(classes, *out_size)))

    monkeypatch.setattr(writer, "fuse_image", fake_fuse)
    return fused


def _cfg(root: Path, work: Path, *extra):
    lst = f"{root}/ImageSets/Segmentation"
    over = [f"work_dir={work}", f"data.root={root}", f"data.train_list={lst}/train.txt",
            f"data.infer_list={lst}/train.txt", "num_workers=0", "model.pretrained=", "inference.scales=[1.0]",
            "inference.flip=false", "pseudo_masks.overlays=0", "crf.workers=1", "crf.overlays=0", *extra]
    cfg = load_config("demo", over)
    ckpt = work.parent / "stage2.pth"
    if not ckpt.is_file():
        save_checkpoint(ckpt, build_model(Config(dict(cfg.model, head="smaf")), 5))   # unused: maps by hand
    return load_config("demo", over + [f"pseudo_masks.checkpoint={ckpt}"])


def _labelled(root: Path) -> dict:
    """{id: labelled class indices} read straight from cls_labels.npy."""
    raw = np.load(root / "cls_labels.npy", allow_pickle=True).item()
    return {k: np.nonzero(np.asarray(v) > 0.5)[0].tolist() for k, v in raw.items()}


@pytest.mark.parametrize("rule, q1_is_foreground", [("fixed", True), ("otsu", False)])
def test_masks_are_the_argmax_of_the_written_maps_under_the_configured_rule(tiny_voc, tmp_path, fused_by_hand,
                                                                            rule, q1_is_foreground):
    """fixed 0.2: the first class's 0.25 is foreground. otsu: the per-pixel maximum takes the values 0.1, 0.25
    and 0.9 (0.95) on about a quarter, a quarter and a half of the image, so Otsu's threshold falls between
    0.25 and 0.9 and the 0.25 quarter is background."""
    work = tmp_path / "work"
    gen_pm.run(_cfg(tiny_voc, work, f"inference.bg_method={rule}", "inference.bg_threshold=0.2",
                    "pseudo_masks.crf=false"))
    ids = (tiny_voc / "ImageSets/Segmentation/train.txt").read_text().split()
    labelled = _labelled(tiny_voc)
    assert sorted(map(len, fused_by_hand)) == sorted(len(labelled[i]) for i in ids)
    assert {len(labelled[i]) for i in ids} >= {1, 2, 3}   # one-, two- and three-class images are all checked
    for image_id in ids:
        classes = labelled[image_id]
        mask = load_label_png(work / "pseudo_masks" / "cam_png" / f"{image_id}.png")
        h, w = mask.shape
        np.testing.assert_array_equal(mask, expected_mask(classes, h, w, q1_is_foreground), err_msg=image_id)
        cams = load_cam_dict(work / "pseudo_masks" / "cam_npy" / f"{image_id}.npy")
        assert sorted(cams) == classes, image_id
        for j, c in enumerate(classes):
            np.testing.assert_array_equal(cams[c], hand_made_maps(classes, h, w)[j])


def _mtimes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")
            if p.is_file() and p.parent.name in ("cam_npy", "cam_png", "crf_png")}


def test_a_rerun_redoes_exactly_the_images_with_missing_files(tiny_voc, tmp_path, fused_by_hand):
    """An image is finished when both its map and its mask exist; a CRF mask when it exists. A rerun after
    deleting A's map, B's mask and C's CRF mask fuses A and B again (both files rewritten, the same content)
    and refines C only; nothing else is touched, and the log says how many were skipped."""
    work = tmp_path / "work"
    cfg = _cfg(tiny_voc, work, "inference.bg_method=fixed")
    gen_pm.run(cfg)
    out = work / "pseudo_masks"
    ids = (tiny_voc / "ImageSets/Segmentation/train.txt").read_text().split()
    assert len(fused_by_hand) == len(ids)
    a, b, c = ids[1], ids[4], ids[7]
    before = {name: (out / name).read_bytes() for name in _mtimes(out)}
    (out / "cam_npy" / f"{a}.npy").unlink()
    (out / "cam_png" / f"{b}.png").unlink()
    (out / "crf_png" / f"{c}.png").unlink()
    times = _mtimes(out)
    log_before = (out / "log.txt").read_text()
    del fused_by_hand[:]
    gen_pm.run(cfg)
    assert len(fused_by_hand) == 2
    after = _mtimes(out)
    assert set(after) == set(before)
    rewritten = sorted(name for name in after if after[name] != times.get(name))
    assert rewritten == sorted([f"cam_npy/{a}.npy", f"cam_png/{a}.png", f"cam_npy/{b}.npy", f"cam_png/{b}.png",
                                f"crf_png/{c}.png"])
    assert all((out / name).read_bytes() == before[name] for name in after if name.endswith(".png"))
    assert f"{len(ids) - 2} of {len(ids)} images already done (skipped)" in (out / "log.txt").read_text()[
        len(log_before):]
