"""PAR (AFA's pixel-adaptive refinement): the module's constants and behaviour on constructed images, AFA's
two-score training labels, and the refinement step over a folder of CAM dicts."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from smaf.cam.background import BackgroundRule
from smaf.config import ConfigError, load_config
from smaf.refine.par import PAR, PARParams, PARRefiner, par_offsets, refine_cams_with_background


def test_par_neighbourhood_is_afa_8_neighbours_at_six_dilations():
    offsets, distances = par_offsets()
    assert len(offsets) == 48 and len(set(offsets)) == 48
    assert {max(abs(dy), abs(dx)) for dy, dx in offsets} == {1, 2, 4, 8, 12, 24}
    for (dy, dx), d in zip(offsets, distances):
        assert d == pytest.approx(max(abs(dy), abs(dx)) * (math.sqrt(2) if dy and dx else 1))
    p = PAR()
    assert p.iterations == 10 and p.pad == 24 and p.pos_softmax.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="dilations must be >= 1"):
        PAR(dilations=(0, 1))


def test_par_leaves_a_constant_map_unchanged():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 40, 56)
    masks = torch.full((2, 3, 40, 56), 0.7)
    masks[1] = 0.2
    par = PAR()
    weights = par.affinity(image)
    torch.testing.assert_close(weights.sum(1), torch.ones(2, 40, 56), atol=1e-5, rtol=0)
    assert (weights >= 0).all()
    torch.testing.assert_close(par(image, masks), masks, atol=1e-5, rtol=0)


def _edge_image(step: float, seed: int = 0) -> torch.Tensor:
    """64 x 64 grey image with texture noise (std 0.05) and a vertical step of ``step`` at x = 32."""
    g = torch.Generator().manual_seed(seed)
    image = torch.full((1, 3, 64, 64), 0.3)
    image[..., 32:] += step
    return image + 0.05 * torch.randn(image.shape, generator=g)


def _refined_foreground_columns(step: float, fg_until: int) -> torch.Tensor:
    """Fraction of foreground pixels per column after PAR of [0.5; fg], fg = 1 on columns < fg_until."""
    fg = torch.zeros(1, 1, 64, 64)
    fg[..., :fg_until] = 1.0
    out = PAR()(_edge_image(step), torch.cat([torch.full_like(fg, 0.5), fg], 1))
    return out.argmax(1)[0].float().mean(0)


def test_par_moves_labels_across_a_weak_edge_but_not_across_a_strong_one():
    # A mask overshooting the image edge at x = 32 by 8 px: a strong edge pulls the label back to it...
    strong = _refined_foreground_columns(0.5, 40)
    assert (strong[:32] == 1).all() and (strong[32:] == 0).all()
    # ...an edge weaker than the texture does not stop it: the label stays across x = 32
    weak = _refined_foreground_columns(0.02, 40)
    assert weak[32:38].mean() > 0.5 and weak[:24].mean() > 0.7
    # A mask stopping 8 px short of a strong edge grows up to the edge and no further
    grown = _refined_foreground_columns(0.5, 24)
    assert (grown[:32] == 1).all() and (grown[32:] == 0).all()
    assert _refined_foreground_columns(0.02, 24)[24:32].mean() < 0.6   # without the edge it does not fill in


def test_par_of_a_constant_background_score_refines_the_maps_alone():
    torch.manual_seed(1)
    image, maps = torch.rand(1, 3, 30, 30), torch.rand(1, 2, 30, 30)
    par = PAR(iterations=3)
    joint = par(image, torch.cat([torch.full_like(maps[:, :1], 0.3), maps], 1))
    torch.testing.assert_close(joint[:, 1:], par(image, maps), atol=1e-5, rtol=0)
    torch.testing.assert_close(joint[:, :1], torch.full_like(joint[:, :1], 0.3), atol=1e-5, rtol=0)


def test_afa_two_score_labels_mark_the_uncertain_band_and_the_padding():
    images = torch.rand(2, 3, 32, 32)
    cams = torch.zeros(2, 4, 32, 32)
    cams[0, 2, :, :12] = 0.9         # class 2 of image 0: confident on the left
    cams[0, 2, :, 12:20] = 0.45      # between 0.35 and 0.55: background for the high score only
    cams[1, 0] = 0.9
    labels = torch.tensor([[0.0, 0, 1, 0], [1.0, 0, 0, 0]])
    valid = torch.ones(2, 32, 32, dtype=torch.bool)
    valid[1, :, -4:] = False
    out = refine_cams_with_background(PAR(iterations=0), images, cams, labels, valid=valid, scale=1.0)
    assert out.shape == (2, 32, 32) and out.dtype == torch.long
    assert (out[0, :, :12] == 3).all() and (out[0, :, 12:20] == 255).all() and (out[0, :, 20:] == 0).all()
    assert (out[1, :, :-4] == 1).all() and (out[1, :, -4:] == 255).all()


def test_par_params_come_from_the_config_and_bad_values_are_config_errors():
    sect = load_config("voc12").par
    params = PARParams.from_config(sect)
    assert params == PARParams() and params.dilations == (1, 2, 4, 8, 12, 24) and params.scale == 0.5
    with pytest.raises(ConfigError, match="par.scale=1.5"):
        PARParams.from_config(load_config("voc12", ["par.scale=1.5"]).par)


def test_par_refiner_over_a_folder_writes_labels_and_refined_dicts(tiny_voc, tmp_path):
    from smaf.data.voc import VOCLayout
    from smaf.io import load_cam_dict, load_label_png, save_cam_dict
    from smaf.refine import refine_folder

    layout = VOCLayout(tiny_voc)
    ids = layout.read_list(tiny_voc / "ImageSets" / "Segmentation" / "train.txt")[:6]
    rng = np.random.default_rng(0)
    for i in ids:   # the true masks, softened and noisy
        mask = layout.load_mask(i)
        cams = {c: np.clip(np.where(mask == c + 1, 0.8, 0.1) + rng.normal(0, 0.3, mask.shape), 0, 1).astype(np.float32)
                for c in np.nonzero(layout.labels[i] > 0.5)[0]}
        save_cam_dict(tmp_path / "npy" / f"{i}.npy", cams)
    refiner = PARRefiner(PARParams(), BackgroundRule("fixed", 0.45))
    assert refine_folder(layout, tmp_path / "npy", tmp_path / "one" / "png", ids, refiner, 1,
                         npy_dir=tmp_path / "one" / "npy") == 6
    assert refine_folder(layout, tmp_path / "npy", tmp_path / "pool" / "png", ids, refiner, 2, overlay_ids=ids[:1],
                         npy_dir=tmp_path / "pool" / "npy") == 6
    before = after = 0.0
    for i in ids:
        mask, cams = layout.load_mask(i), load_cam_dict(tmp_path / "npy" / f"{i}.npy")
        out = load_label_png(tmp_path / "one" / "png" / f"{i}.png")
        np.testing.assert_array_equal(out, load_label_png(tmp_path / "pool" / "png" / f"{i}.png"))
        refined = load_cam_dict(tmp_path / "one" / "npy" / f"{i}.npy")
        assert sorted(refined) == sorted(cams) and all(v.shape == mask.shape for v in refined.values())
        assert all(0 <= v.min() and v.max() <= 1 for v in refined.values())
        keys = sorted(cams)
        plain = np.array([0] + [k + 1 for k in keys])[np.concatenate([np.full((1, *mask.shape), 0.45),
                                                                       np.stack([cams[k] for k in keys])]).argmax(0)]
        valid = mask != 255
        before += (plain[valid] == mask[valid]).mean() / len(ids)
        after += (out[valid] == mask[valid]).mean() / len(ids)
    assert after > before + 0.05 and after > 0.9           # the noise is smoothed away
    assert (tmp_path / "pool" / "overlays" / f"{ids[0]}_par.jpg").is_file()
    assert refine_folder(layout, tmp_path / "npy", tmp_path / "one" / "png", ids, refiner, 1,
                         npy_dir=tmp_path / "one" / "npy") == 0          # finished: skipped
    (tmp_path / "one" / "npy" / f"{ids[0]}.npy").unlink()                # a missing dict is redone
    assert refine_folder(layout, tmp_path / "npy", tmp_path / "one" / "png", ids, refiner, 1,
                         npy_dir=tmp_path / "one" / "npy") == 1


def test_par_step_refines_a_cam_folder_and_evaluates_it(tiny_voc, tmp_path):
    from smaf.data.voc import VOCLayout
    from smaf.io import save_cam_dict
    from smaf.stages import par

    layout = VOCLayout(tiny_voc)
    lst = tiny_voc / "ImageSets" / "Segmentation" / "val.txt"
    ids = layout.read_list(lst)
    for i in ids:
        mask = layout.load_mask(i)
        save_cam_dict(tmp_path / "cams" / f"{i}.npy",
                      {c: np.where(mask == c + 1, 0.9, 0.05).astype(np.float32)
                       for c in np.nonzero(layout.labels[i] > 0.5)[0]})
    # a fixed score: Otsu of two-valued maps sits at the low value
    cfg = load_config("demo", [f"data.root={tiny_voc}", f"data.train_list={lst}", f"data.infer_list={lst}",
                               f"data.val_list={lst}", f"work_dir={tmp_path / 'run'}",
                               f"par.input_dir={tmp_path / 'cams'}", "par.workers=1", "par.overlays=1", "par.scale=1.0",
                               "inference.bg_method=fixed", "inference.bg_threshold=0.45"])
    result = par.run(cfg)
    assert result["refined"] == len(ids) and result["miou"] > 60   # (masks as maps: thin shapes blur a little)
    assert result["png_dir"] == tmp_path / "run" / "par" / "cam_png"
    assert len(list(result["npy_dir"].glob("*.npy"))) == len(ids)
    assert (tmp_path / "run" / "par" / "eval" / "cam_png.json").is_file()
    assert par.run(cfg)["refined"] == 0                                   # resumable: nothing left to do
