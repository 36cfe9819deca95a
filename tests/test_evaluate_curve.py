"""``python -m smaf.evaluate --curve`` with a ``--bg`` off the 0.00..0.60 grid: the report's numbers are
those AT that value (swept with the grid), while the curve, its CSV and its GT-tuned best stay the 61 grid
points. Expected values are counted by hand from the masks."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from smaf.evaluate import DEFAULT_THRESHOLDS, GT_TUNED_LABEL, main
from smaf.io import save_cam_dict, save_label_png

OBJECT, REST = 0.336, 0.331    # class-4 score on its object and elsewhere: only t in [0.331, 0.336) is perfect
N_OBJ, N_BG = 16 + 24, 74 + 60  # scored pixels of the two images (row 0 of each is 255, ignored)
ALL_FG = 50 * N_OBJ / (N_OBJ + N_BG)   # t <= 0.33: everything class 4 (background IoU 0)
ALL_BG = 50 * N_BG / (N_OBJ + N_BG)    # t >= 0.34: everything background (class-4 IoU 0)


@pytest.fixture
def cams(tmp_path):
    for image_id, (h, w), (rows, cols) in (("a", (10, 10), (slice(2, 6), slice(2, 6))),
                                          ("b", (8, 12), (slice(3, 7), slice(0, 6)))):
        gt = np.zeros((h, w), np.uint8)
        gt[rows, cols] = 5                     # class index 4 (bottle) in VOC numbering
        save_cam_dict(tmp_path / "npy" / f"{image_id}.npy", {4: np.where(gt == 5, OBJECT, REST).astype(np.float32)})
        gt[0] = 255
        save_label_png(tmp_path / "gt" / f"{image_id}.png", gt)
    return tmp_path


def _curve(cams, bg: str, capsys):
    out = cams / f"report_{bg}"
    assert main(["--pred", str(cams / "npy"), "--gt", str(cams / "gt"), "--curve", "--bg", bg, "--out", str(out),
                 "--name", "r", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((out / "curve.csv").open()))
    return json.loads((out / "r.json").read_text()), rows, printed


def test_an_off_grid_background_score_is_scored_exactly_and_kept_out_of_the_curve(cams, capsys):
    report, rows, printed = _curve(cams, "0.333", capsys)
    assert report["bg_threshold"] == 0.333
    assert report["miou"] == 100.0                 # at 0.333 itself, not at the nearest grid point (11.49 / 38.51)
    assert {c["name"]: c["iou"] for c in report["classes"] if c["iou"] is not None} == {"background": 100.0,
                                                                                         "bottle": 100.0}
    curve = report["curve"]
    assert [t for t, _ in curve] == list(DEFAULT_THRESHOLDS)            # 61 grid points, 0.333 not among them
    for t, miou in curve:
        assert miou == pytest.approx(ALL_FG if t <= 0.33 else ALL_BG, rel=1e-12), t
    assert [float(r["threshold"]) for r in rows] == pytest.approx(list(DEFAULT_THRESHOLDS))
    # the GT-tuned best is taken on the grid only: its first maximum (0.34), never the off-grid 0.333
    assert report["best_threshold"] == 0.34 and report["best_miou"] == pytest.approx(ALL_BG, rel=1e-12)
    assert f"{GT_TUNED_LABEL}: 0.34 -> mIoU {ALL_BG:.2f}" in printed
    assert "CAM .npy at the fixed background threshold 0.33" in printed and "100.00" in printed


@pytest.mark.parametrize("bg", ["0.2000001", "0.20000000001"])
def test_a_background_score_next_to_a_grid_point_adds_no_curve_row(cams, capsys, bg):
    """0.2000001 differs from 0.2 in float32 (swept on its own), 0.20000000001 does not (it is 0.2 where the
    thresholds are compared): either way the curve keeps 61 rows, one per grid point, and the report is
    scored at --bg."""
    report, rows, _ = _curve(cams, bg, capsys)
    assert len(rows) == 61 and [t for t, _ in report["curve"]] == list(DEFAULT_THRESHOLDS)
    assert report["bg_threshold"] == float(bg) and report["miou"] == pytest.approx(ALL_FG, rel=1e-12)
