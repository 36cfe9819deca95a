"""Evaluation: confusion matrices, folder evaluation on the real VOC val masks, the threshold curve and the
``python -m smaf.evaluate`` CLI."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from smaf.data.voc import VOC_CLASSES, read_id_list
from smaf.evaluate import (DEFAULT_THRESHOLDS, GT_TUNED_LABEL, evaluate_folder, main, plot_curve,
                           sweep_confusions, threshold_curve, write_curve_csv, write_report)
from smaf.io import cam_dict_to_label, load_label_png, save_cam_dict, save_label_png
from smaf.metrics import confusion_matrix, format_table, scores


REPO_ROOT = Path(__file__).resolve().parents[1]
VOC_NAMES = ["background"] + list(VOC_CLASSES)


def brute_force_counts(pairs, num_labels: int):
    """Independent reference: per class, TP/FP/FN counted with boolean masks (no bincount).

    ``pairs`` yields (prediction, ground truth); the prediction is cropped to the ground-truth size, ground
    truth 255 is ignored, and a prediction outside 0..K-1 is wrong for its ground-truth class and counts as
    nobody's false positive."""
    tp = np.zeros(num_labels, np.int64)
    fp = np.zeros(num_labels, np.int64)
    fn = np.zeros(num_labels, np.int64)
    for pred, gt in pairs:
        pred = pred[:gt.shape[0], :gt.shape[1]]
        valid = gt != 255
        for c in range(num_labels):
            is_gt = gt == c
            is_pred = (pred == c) & valid
            tp[c] += int(np.sum(is_gt & is_pred))
            fp[c] += int(np.sum(is_pred & ~is_gt))
            fn[c] += int(np.sum(is_gt & ~is_pred))
    return tp, fp, fn


def brute_force_miou(tp, fp, fn) -> float:
    ious = [t / (t + p + n) for t, p, n in zip(tp.tolist(), fp.tolist(), fn.tolist()) if t + p + n > 0]
    return 100.0 * float(np.mean(ious))


# ------------------------------------------------------------------------------------ metrics (unit)
def test_confusion_matrix_small_case():
    gt = np.array([[0, 0, 1, 1],
                   [0, 2, 2, 255]], np.uint8)
    pred = np.array([[0, 1, 1, 1, 7],
                     [2, 2, 255, 0, 7],
                     [9, 9, 9, 9, 9]], np.uint8)  # larger than gt: cropped to 2x4
    conf = confusion_matrix(pred, gt, num_classes=2)
    assert conf.shape == (3, 4) and conf.dtype == np.int64
    expected = np.array([[1, 1, 1, 0],    # gt 0: pred 0, 1, 2
                         [0, 2, 0, 0],    # gt 1: pred 1, 1
                         [0, 0, 1, 1]])   # gt 2: pred 2, 255 (unassigned); gt 255 ignored
    np.testing.assert_array_equal(conf, expected)
    res = scores(conf, ["background", "a", "b"], num_images=1)
    bg, a, b = res["classes"]
    assert (bg["tp"], bg["fp"], bg["fn"]) == (1, 0, 2)
    assert (a["tp"], a["fp"], a["fn"]) == (2, 1, 0)
    assert (b["tp"], b["fp"], b["fn"]) == (1, 1, 1)   # the 255 prediction is a false negative of b only
    assert res["unassigned_pixels"] == 1 and res["num_pixels"] == 7 and res["num_images"] == 1
    assert res["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 1 / 3) / 3)
    assert res["pixel_accuracy"] == pytest.approx(100 * 4 / 7)
    assert b["precision"] == 50.0 and b["recall"] == 50.0
    table = format_table(res, title="small")
    assert "mIoU" in table and "pixel acc." in table and "unassigned" not in table.split("\n")[0]


def test_undefined_classes_are_left_out_of_the_mean():
    gt = np.zeros((3, 3), np.uint8)
    res = scores(confusion_matrix(gt, gt, num_classes=4), ["background", "a", "b", "c", "d"])
    assert res["miou"] == 100.0 and res["num_scored_classes"] == 1
    assert res["iou"]["a"] is None and res["classes"][1]["precision"] is None
    assert "-" in format_table(res)


def test_prediction_smaller_than_gt_raises():
    with pytest.raises(ValueError, match="prediction is 3x4"):
        confusion_matrix(np.zeros((3, 4), np.uint8), np.zeros((3, 5), np.uint8), 20)


def test_scores_rejects_wrong_class_count():
    with pytest.raises(ValueError, match="class count mismatch"):
        scores(np.zeros((3, 4), np.int64), ["background", "a"])


def test_scores_accepts_a_square_matrix():
    conf = np.array([[3, 1], [0, 2]])
    res = scores(conf, ["background", "a"])
    assert res["classes"][1]["iou"] == pytest.approx(100 * 2 / 3) and res["unassigned_pixels"] == 0


# --------------------------------------------------------------------- real VOC val masks (1449 files)
@pytest.mark.cost(17)
def test_voc_val_masks_against_themselves_give_100(voc_meta, tmp_path):
    ids = read_id_list(voc_meta / "val.txt")
    assert len(ids) == 1449
    gt_dir = voc_meta / "SegmentationClassAug_val"
    result = evaluate_folder(gt_dir, gt_dir, ids, VOC_NAMES)
    assert result["miou"] == 100.0
    assert result["num_images"] == 1449 and result["num_scored_classes"] == 21
    assert result["pixel_accuracy"] == 100.0
    path = write_report(result, tmp_path, "self")
    assert json.loads(path.read_text())["miou"] == 100.0


def _perturb(gt: np.ndarray, rng: np.random.Generator, index: int) -> np.ndarray:
    """A deterministic wrong prediction for ``gt``: shift, class swaps in blocks, ignore pixels, and every
    third one larger than the mask (the extra rows/columns hold junk that must be cropped away)."""
    h, w = gt.shape
    pred = np.roll(gt, (int(rng.integers(-12, 13)), int(rng.integers(-12, 13))), axis=(0, 1)).copy()
    pred[pred == 255] = 0  # predictions rarely contain ignore; ground-truth borders become background
    for _ in range(int(rng.integers(1, 6))):
        y, x = int(rng.integers(0, h)), int(rng.integers(0, w))
        bh, bw = int(rng.integers(5, 80)), int(rng.integers(5, 80))
        pred[y:y + bh, x:x + bw] = rng.integers(0, 21)
    if index % 2 == 0:  # scattered 255 predictions: wrong for their ground-truth class, nobody's FP
        pred[rng.random((h, w)) < 0.02] = 255
    if index % 3 == 0:
        pred = np.pad(pred, ((0, int(rng.integers(1, 20))), (0, int(rng.integers(1, 20)))), mode="wrap")
        pred[h:, :] = rng.integers(0, 21)
        pred[:, w:] = 255
    return pred


def test_perturbed_predictions_match_brute_force(voc_meta, tmp_path):
    ids = read_id_list(voc_meta / "val.txt")[::7]  # 207 ids, deterministic
    assert len(ids) >= 200
    gt_dir = voc_meta / "SegmentationClassAug_val"
    pred_dir = tmp_path / "pred"
    rng = np.random.default_rng(0)
    pairs = []
    for i, image_id in enumerate(ids):
        gt = load_label_png(gt_dir / f"{image_id}.png")
        pred = _perturb(gt, rng, i)
        save_label_png(pred_dir / f"{image_id}.png", pred)
        pairs.append((pred, gt))
    tp, fp, fn = brute_force_counts(pairs, 21)
    result = evaluate_folder(pred_dir, gt_dir, ids, VOC_NAMES, workers=2)
    assert [c["tp"] for c in result["classes"]] == tp.tolist()
    assert [c["fp"] for c in result["classes"]] == fp.tolist()
    assert [c["fn"] for c in result["classes"]] == fn.tolist()
    assert result["miou"] == brute_force_miou(tp, fp, fn)
    assert result["unassigned_pixels"] > 0
    assert 0 < result["miou"] < 100


# -------------------------------------------------------------------------- CAM dicts and the curve
def _make_cam_case(tmp_path: Path, n_images: int = 6):
    """CAM dicts whose best background threshold is known: foreground score 0.37 on the object, 0.30 on
    the background, so every t in [0.30, 0.37) is perfect (ties go to the background)."""
    rng = np.random.default_rng(3)
    npy_dir, gt_dir = tmp_path / "npy", tmp_path / "gt"
    ids = []
    for i in range(n_images):
        h, w = int(rng.integers(20, 50)), int(rng.integers(20, 50))
        cls = int(rng.integers(0, 20))
        gt = np.zeros((h, w), np.uint8)
        y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        gt[y:y + h // 2, x:x + w // 2] = cls + 1
        fg = np.where(gt == cls + 1, 0.37, 0.30).astype(np.float32)
        gt[0, :] = 255  # an ignored border row, as in VOC
        cams = {cls: fg}
        if i % 2:  # a second, weaker class everywhere never wins
            cams[(cls + 1) % 20] = np.full((h, w), 0.1, np.float32)
        image_id = f"img_{i:03d}"
        save_cam_dict(npy_dir / f"{image_id}.npy", cams)
        save_label_png(gt_dir / f"{image_id}.png", gt)
        ids.append(image_id)
    return npy_dir, gt_dir, ids


def test_threshold_curve_matches_evaluate_folder(voc_meta, tmp_path):
    """The vectorised sweep equals evaluate_folder at each threshold, on real masks with random CAMs."""
    gt_dir = voc_meta / "SegmentationClassAug_val"
    ids = read_id_list(voc_meta / "val.txt")[:40]
    rng = np.random.default_rng(1)
    npy_dir = tmp_path / "npy"
    for image_id in ids:
        gt = load_label_png(gt_dir / f"{image_id}.png")
        present = sorted({int(v) - 1 for v in np.unique(gt) if 0 < v < 255})
        cams = {c: np.clip(rng.random(gt.shape, dtype=np.float32) * 0.5 + 0.3 * (gt == c + 1), 0, 1)
                for c in present}
        if cams:
            cams[present[0]][:3, :3] = 0.25  # exact ties with a threshold on the grid
        save_cam_dict(npy_dir / f"{image_id}.npy", cams)
    thresholds = [0.0, 0.1, 0.25, 0.33, 0.6]
    curve = threshold_curve(npy_dir, gt_dir, ids, VOC_NAMES, thresholds=thresholds[::-1])
    assert [t for t, _ in curve] == thresholds
    for t, miou in curve:
        direct = evaluate_folder(npy_dir, gt_dir, ids, VOC_NAMES, bg_threshold=t)
        assert miou == direct["miou"], t
    thr, confs = sweep_confusions(npy_dir, gt_dir, ids, VOC_NAMES, thresholds)
    direct = evaluate_folder(npy_dir, gt_dir, ids, VOC_NAMES, bg_threshold=0.25)
    np.testing.assert_array_equal(confs[2], np.array(direct["confusion"]))


def test_cam_dict_labels_follow_io_convention(tmp_path):
    npy_dir, gt_dir, ids = _make_cam_case(tmp_path, 2)
    curve = dict(threshold_curve(npy_dir, gt_dir, ids, VOC_NAMES))
    assert len(curve) == 61 and min(curve) == 0.0 and max(curve) == 0.6
    assert list(curve) == list(DEFAULT_THRESHOLDS)
    for t in (0.29, 0.30, 0.36, 0.37):
        res = evaluate_folder(npy_dir, gt_dir, ids, VOC_NAMES, bg_threshold=t)
        assert res["miou"] == curve[t]
        assert (res["miou"] == 100.0) == (0.30 <= t < 0.37)
    from smaf.io import load_cam_dict
    cams = load_cam_dict(npy_dir / f"{ids[0]}.npy")
    label = cam_dict_to_label(cams, 0.30)
    gt = load_label_png(gt_dir / f"{ids[0]}.png")
    (cls,) = cams
    # 0.30 on the background ties with t = 0.30: background; 0.37 on the object is above it: class + 1 (VOC numbering)
    np.testing.assert_array_equal(label, np.where(cams[cls] == np.float32(0.37), cls + 1, 0))
    assert np.array_equal(label[1:], gt[1:])  # row 0 is the ignored border

    # A constructed tie, pixel by pixel. Background score t = 0.3 (compared in float32); classes 2 and 7.
    t = 0.3
    just_above = np.nextafter(np.float32(t), np.float32(1))
    a = np.array([[t, t, 0.5, 0.5, 0.2, just_above]], np.float32)   # class 2 (VOC label 3)
    b = np.array([[t, 0.1, 0.5, 0.6, 0.2, just_above]], np.float32)  # class 7 (VOC label 8)
    tie = {7: b, 2: a}  # insertion order must not matter: ties go to the smaller class index
    expected = np.array([[0,   # both classes tie with the background: background
                          0,   # class 2 ties with the background, class 7 below: background
                          3,   # classes tie above t: the smaller class index, 2 -> label 3
                          8,   # class 7 above class 2: label 8
                          0,   # both below t
                          3]], np.uint8)  # one float32 step above t wins; the tie between classes -> 3
    got = cam_dict_to_label(tie, t)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
    # A threshold given as float64 is compared in float32: t exactly is background, the next float32 is not.
    np.testing.assert_array_equal(cam_dict_to_label({0: np.array([[t, just_above]], np.float32)}, t), [[0, 1]])


def test_cli_curve_finds_the_known_best_threshold(tmp_path):
    npy_dir, gt_dir, ids = _make_cam_case(tmp_path)
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, "-m", "smaf.evaluate", "--pred", str(npy_dir), "--gt", str(gt_dir),
                           "--curve", "--out", str(out), "--name", "cams"],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(GT_TUNED_LABEL))
    best_t = float(line.split(":")[1].split("->")[0])
    # every t in [0.30, 0.37) gives 100; the rule sends ties to the smallest t, so exactly 0.30
    assert best_t == 0.30
    assert line == f"{GT_TUNED_LABEL}: 0.30 -> mIoU 100.00"
    rows = list(csv.DictReader((out / "curve.csv").open()))
    assert len(rows) == 61
    perfect = [float(r["threshold"]) for r in rows if float(r["miou"]) == 100.0]
    assert perfect == pytest.approx([i / 100 for i in range(30, 37)])
    assert (out / "curve.png").stat().st_size > 1000
    report = json.loads((out / "cams.json").read_text())
    assert report["best_threshold"] == 0.30 and report["best_miou"] == 100.0 and report["bg_threshold"] == 0.2
    assert "ground truth" in report["best_threshold_note"]


def test_cli_png_input_and_missing_prediction_file(tmp_path, capsys):
    gt = np.zeros((10, 12), np.uint8)
    gt[2:6, 3:9] = 3
    for image_id in ("a", "b"):
        save_label_png(tmp_path / "gt" / f"{image_id}.png", gt)
    save_label_png(tmp_path / "pred" / "a.png", gt)
    (tmp_path / "list.txt").write_text("/JPEGImages/a.jpg /SegmentationClassAug/a.png\n")
    assert main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
                 "--list", str(tmp_path / "list.txt")]) == 0
    out = capsys.readouterr().out
    assert "evaluating 1 ids" in out and "mIoU" in out
    assert json.loads((tmp_path / "eval" / "pred_list.json").read_text())["miou"] == 100.0
    # no --list: every mask of the GT folder, so b's prediction is missing
    assert main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "b.png" in err and "stage" in err and len(err.strip().splitlines()) == 1


def test_cli_class_count_mismatch(tmp_path, capsys):
    gt = np.zeros((8, 8), np.uint8)
    gt[:4] = 5
    save_label_png(tmp_path / "gt" / "x.png", gt)
    save_label_png(tmp_path / "pred" / "x.png", gt)
    (tmp_path / "labels.txt").write_text("background\ncat\ndog\n")
    assert main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt")]) == 2
    err = capsys.readouterr().err
    assert "class count mismatch" in err and "x.png" in err and "--labels" in err


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "smaf.evaluate", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=120)


def test_cli_errors_are_one_line(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    save_label_png(gt_dir / "big_image.png", np.ones((20, 30), np.uint8))
    save_label_png(pred_dir / "big_image.png", np.ones((20, 29), np.uint8))

    proc = _run_cli("--pred", tmp_path / "no_such_folder", "--gt", gt_dir)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "error:" in text and "no_such_folder" in text and "Traceback" not in text
    assert len(proc.stderr.strip().splitlines()) == 1

    proc = _run_cli("--pred", pred_dir, "--gt", gt_dir)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "error:" in text and "big_image.png" in text and "Traceback" not in text
    assert "20x29" in proc.stderr and "20x30" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_curve_outputs_written_directly(tmp_path):
    curve = [(i / 100, 40 + 10 * np.sin(i / 20)) for i in range(61)]
    csv_path = write_curve_csv(curve, tmp_path / "c.csv")
    png_path = plot_curve(curve, tmp_path / "c.png")
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "threshold,miou"
    assert len(lines) == 1 + len(curve)
    for line, (t, miou) in zip(lines[1:], curve):   # every row, in order, both columns
        t_text, miou_text = line.split(",")
        assert float(t_text) == pytest.approx(t, abs=5e-5) and float(miou_text) == pytest.approx(miou, abs=5e-5)
    assert lines[1] == "0.0000,40.0000" and lines[21] == f"0.2000,{40 + 10 * np.sin(1):.4f}"
    # an undefined mIoU (no scored pixels) is an empty cell, not 'None' or 0
    assert write_curve_csv([(0.1, None), (0.2, 12.5)], tmp_path / "n.csv").read_text() == \
        "threshold,miou\n0.1000,\n0.2000,12.5000\n"
    from smaf.io import load_image
    img = load_image(png_path)
    assert img.shape == (540, 900, 3) and (img != 255).any()
    flat = plot_curve([(0.2, 50.0)], tmp_path / "flat.png")  # one point still draws
    assert flat.is_file()


def test_cli_root_reads_masks_and_class_names(tiny_voc, tmp_path, capsys):
    """``--root``: masks from the layout's mask folder, class names from its labels.txt, two-column lists."""
    from smaf.data.voc import VOCLayout

    layout = VOCLayout(tiny_voc)
    val = tiny_voc / "ImageSets" / "Segmentation" / "val.txt"
    assert main(["--pred", str(layout.mask_dir), "--root", str(tiny_voc), "--list", str(val),
                 "--out", str(tmp_path), "--name", "self", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "6 classes from" in out and "evaluating 6 ids" in out
    report = json.loads((tmp_path / "self.json").read_text())
    assert report["miou"] == 100.0 and [c["name"] for c in report["classes"]] == ["background"] + layout.class_names
