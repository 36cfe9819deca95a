"""The background rule of the label maps: a fixed score, or each image's Otsu threshold (GT-free)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from smaf.cam import BackgroundRule, FusedResult, background_score, label_from_maps, otsu_threshold
from smaf.evaluate import evaluate_folder, main
from smaf.io import save_cam_dict, save_label_png

NAMES = ["background", "cat", "dog"]


def brute_force_otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu by definition: for every bin edge, the between-class variance w0 w1 (mu0 - mu1)^2 of the binned
    values; the edge with the largest one."""
    idx = np.minimum((values * bins).astype(np.int64), bins - 1)
    centres = (np.arange(bins) + 0.5) / bins
    best, best_t = -1.0, None
    for k in range(1, bins):
        low, high = centres[idx[idx < k]], centres[idx[idx >= k]]
        if len(low) == 0 or len(high) == 0:
            continue
        w0, w1 = len(low) / len(values), len(high) / len(values)
        var = w0 * w1 * (low.mean() - high.mean()) ** 2
        if var > best + 1e-15:
            best, best_t = var, k / bins
    return best_t


def two_mode_map(rng, fg_mean: float, bg_mean: float, shape=(40, 50), fg_fraction: float = 0.3) -> np.ndarray:
    values = rng.normal(bg_mean, 0.04, shape)
    mask = rng.random(shape) < fg_fraction
    values[mask] = rng.normal(fg_mean, 0.04, mask.sum())
    return np.clip(values, 0, 1).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_otsu_threshold_matches_the_definition_and_splits_two_modes(seed):
    rng = np.random.default_rng(seed)
    fg, bg = rng.uniform(0.55, 0.9), rng.uniform(0.05, 0.3)
    m = two_mode_map(rng, fg, bg)
    t = otsu_threshold(torch.from_numpy(m))
    assert t == pytest.approx(brute_force_otsu(m), abs=1e-9)
    assert bg + 0.05 < t < fg - 0.05


def test_otsu_threshold_of_flat_maps_is_none_and_the_rule_falls_back():
    assert otsu_threshold(torch.full((10, 10), 0.4)) is None
    assert background_score(np.full((1, 10, 10), 0.4, np.float32), "otsu", 0.2) == 0.2
    assert background_score(np.zeros((0, 10, 10), np.float32), "otsu", 0.25) == 0.25   # no labelled class


def test_background_rule_fixed_otsu_and_bad_method():
    rng = np.random.default_rng(3)
    maps = np.stack([two_mode_map(rng, 0.8, 0.2), np.zeros((40, 50), np.float32)])
    assert BackgroundRule("fixed", 0.3)(maps) == 0.3
    otsu = BackgroundRule("otsu", 0.2)
    # the per-pixel max over the labelled maps is thresholded
    assert otsu(maps) == pytest.approx(brute_force_otsu(maps.max(0)))
    assert otsu(torch.from_numpy(maps)) == otsu(maps)
    assert "Otsu" in str(otsu) and str(BackgroundRule("fixed", 0.2)) == "fixed 0.20"
    with pytest.raises(ValueError, match="bg_method='otsuu'.*fixed, otsu"):
        BackgroundRule("otsuu", 0.2)
    from smaf.config import ConfigError, load_config

    assert BackgroundRule.from_section(load_config("pets").inference, "inference") == BackgroundRule("otsu", 0.2)
    cfg = load_config("pets", ["inference.bg_method=otsuu"])
    with pytest.raises(ConfigError, match=r"inference\.bg_method='otsuu'.*inference\.bg_method=otsu"):
        BackgroundRule.from_section(cfg.inference, "inference")


def test_otsu_labels_an_over_spread_map_better_than_a_fixed_score():
    """A fused ReLU map whose background sits at ~0.35 (a CAM that spreads): 0.20 marks it all as the class,
    the per-image threshold recovers the object."""
    rng = np.random.default_rng(4)
    h, w = 60, 80
    obj = np.zeros((h, w), bool)
    obj[15:45, 20:60] = True
    m = np.where(obj, rng.normal(0.85, 0.05, (h, w)), rng.normal(0.35, 0.05, (h, w))).clip(0, 1).astype(np.float32)
    result = FusedResult([1], torch.from_numpy(m[None]))
    fixed = label_from_maps(result, BackgroundRule("fixed", 0.2)(result.maps)).numpy()
    per_image = label_from_maps(result, BackgroundRule("otsu", 0.2)(result.maps)).numpy()
    assert (fixed == 2).mean() > 0.99
    assert np.array_equal(per_image == 2, obj)


def test_evaluate_folder_and_cli_with_otsu(tmp_path, capsys):
    rng = np.random.default_rng(5)
    npy, gt_dir = tmp_path / "npy", tmp_path / "gt"
    ids = []
    for i, (level, cls) in enumerate([(0.3, 0), (0.4, 1), (0.1, 0)]):
        h, w = 30, 40
        obj = np.zeros((h, w), bool)
        obj[5:20, 10 + i:30] = True
        m = np.where(obj, 0.9, level) + rng.normal(0, 0.02, (h, w))
        save_cam_dict(npy / f"im{i}.npy", {cls: m.clip(0, 1).astype(np.float32)})
        save_label_png(gt_dir / f"im{i}.png", np.where(obj, cls + 1, 0).astype(np.uint8))
        ids.append(f"im{i}")
    res = evaluate_folder(npy, gt_dir, ids, NAMES, bg_threshold=BackgroundRule("otsu", 0.2))
    assert res["miou"] == 100.0 and res["bg_threshold"] == "otsu"
    assert evaluate_folder(npy, gt_dir, ids, NAMES, bg_threshold=0.2)["miou"] < 60
    assert main(["--pred", str(npy), "--gt", str(gt_dir), "--bg", "otsu", "--out", str(tmp_path / "r"),
                 "--name", "o"]) == 0
    assert "Otsu" in capsys.readouterr().out
    assert json.loads((tmp_path / "r" / "o.json").read_text())["miou"] == 100.0
    assert main(["--pred", str(npy), "--gt", str(gt_dir), "--bg", "otsu", "--curve"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--curve" in err and len(err.strip().splitlines()) == 1
