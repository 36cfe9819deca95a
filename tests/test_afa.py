"""AFA (related-methods.md §7): the label rule, affinity labels, affinity, propagation, losses and schedule on
constructed inputs against hand computations; one training step; train_afa + infer_afa end to end."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smaf.config import ConfigError, load_config
from smaf.losses import afa_affinity_loss, background_foreground_ce
from smaf.models.afa import AFANet, AttentionAffinity, afa_spec
from smaf.models.registry import build_from_spec
from smaf.refine.afa import affinity_labels, propagate_cams, threshold_cam_labels, window_mask
from smaf.refine.par import PAR, refine_scores_with_background
from smaf.stages.train_afa import AFALabelParams, AFASchedule, afa_losses

REPO = Path(__file__).resolve().parents[1]


def _tiny_afa(classes=3, seed=0) -> AFANet:
    torch.manual_seed(seed)
    return build_from_spec(afa_spec(classes, "mit_b0", 16))


# ----------------------------------------------------------------------------------------- label rule
def test_threshold_label_rule_on_a_constructed_cam():
    # 2 classes, 1 x 4 pixels: max 0.9 (class 1) -> 2; 0.5 in the band (0.35, 0.55] -> 255; 0.3 -> 0; the last
    # pixel is confident (0.8, class 0 -> label 1) but outside the crop box -> 255
    cams = torch.tensor([[[[0.1, 0.5, 0.3, 0.8]], [[0.9, 0.2, 0.1, 0.0]]]])
    valid = torch.tensor([[[True, True, True, False]]])
    assert threshold_cam_labels(cams, 0.55, 0.35, valid).tolist() == [[[2, 255, 0, 255]]]
    # the thresholds are inclusive: exactly 0.55 -> 255, exactly 0.35 -> 0
    edge = torch.tensor([[[[0.55, 0.35]]]])
    assert threshold_cam_labels(edge, 0.55, 0.35).tolist() == [[[255, 0]]]


def test_two_background_rule_combines_the_high_and_low_labels():
    # PAR with 0 iterations at full scale is the identity, so the labels are the plain argmaxes of the scores.
    # 3 classes, class 1 absent (its channel must never win, though its score is the largest).
    par = PAR(iterations=0)
    images = torch.zeros(1, 3, 1, 4)
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    #                         pixel:   0    1    2    3
    high = torch.tensor([[[[0.1, 0.6, 0.6, 0.2]],     # background
                          [[0.8, 0.3, 0.1, 0.1]],     # class 0 (label 1)
                          [[0.9, 0.9, 0.9, 0.9]],     # class 1: absent
                          [[0.1, 0.1, 0.3, 0.7]]]])   # class 2 (label 3)
    low = torch.tensor([[[[0.0, 0.1, 0.9, 0.0]],
                         [[0.9, 0.8, 0.05, 0.0]],
                         [[0.9, 0.9, 0.9, 0.9]],
                         [[0.1, 0.1, 0.05, 1.0]]]])
    # high argmax: 1, 0, 0, 3; low argmax: 1, 1, 0, 3 -> pixel 1: high bg, low fg -> 255; pixel 2: both bg -> 0
    out = refine_scores_with_background(par, images, high, low, labels, scale=1.0)
    assert out.tolist() == [[[1, 255, 0, 3]]]
    valid = torch.tensor([[[True, True, True, False]]])
    assert refine_scores_with_background(par, images, high, low, labels, 1.0, valid).tolist() == [[[1, 255, 0, 255]]]


def test_affinity_labels_on_a_constructed_label_map():
    # a 2 x 3 label map on a 2 x 3 grid (no resizing): [[0, 0, 1], [255, 1, 1]], radius 1
    label = torch.tensor([[[0, 0, 1], [255, 1, 1]]])
    pairs = affinity_labels(label, (2, 3), radius=1)[0]
    flat = [0, 0, 1, 255, 1, 1]
    for i in range(6):
        for j in range(6):
            yi, xi, yj, xj = i // 3, i % 3, j // 3, j % 3
            if max(abs(yi - yj), abs(xi - xj)) > 1 or 255 in (flat[i], flat[j]):
                expected = 255
            else:
                expected = int(flat[i] == flat[j])
            assert int(pairs[i, j]) == expected, (i, j)
    # spot checks by hand: (0,0)-(0,1) same bg -> 1; (0,1)-(0,2) bg vs class -> 0; (0,0)-(0,2) dx = 2 -> 255
    assert (int(pairs[0, 1]), int(pairs[1, 2]), int(pairs[0, 2]), int(pairs[0, 3])) == (1, 0, 255, 255)


def test_affinity_labels_resize_the_label_map_by_nearest_neighbour():
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    label[:, :, 4:] = 2                                       # right half class 1
    pairs = affinity_labels(label, (2, 2), radius=8)[0]       # grid cells: [bg, fg; bg, fg]
    assert pairs.tolist() == [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]


def test_window_mask_is_the_square_of_the_radius():
    mask = window_mask(5, 5, radius=2)
    centre = mask[12].reshape(5, 5)
    assert bool(centre.all())
    corner = mask[0].reshape(5, 5)
    assert corner.sum() == 9 and bool(corner[:3, :3].all())


# ------------------------------------------------------------------------------------ affinity and propagation
def test_affinity_from_attention_is_symmetric_and_in_unit_interval():
    torch.manual_seed(0)
    head = AttentionAffinity(16)
    with torch.no_grad():
        aff = head(torch.randn(2, 16, 9, 9))
    assert aff.shape == (2, 9, 9)
    assert torch.allclose(aff, aff.transpose(1, 2), atol=1e-6)
    assert float(aff.min()) > 0 and float(aff.max()) < 1
    with torch.no_grad():
        out = _tiny_afa()(torch.randn(1, 3, 64, 64), train_outputs=True)    # through the MiT's stage-4 blocks
    assert out.affinity.shape == (1, 16, 16) and out.grid == (4, 4)
    assert torch.allclose(out.affinity, out.affinity.transpose(1, 2), atol=1e-6)


def test_afa_on_the_vit_drops_the_cls_token_and_decodes_the_token_map():
    torch.manual_seed(0)
    model = build_from_spec(afa_spec(3, "vit_s14_focus", 14, attention_blocks=2))
    assert model.affinity_head.proj.in_channels == 12                       # 2 blocks x 6 heads
    with torch.no_grad():
        out = model(torch.randn(1, 3, 56, 70), train_outputs=True)           # 4 x 5 patches (+ cls)
    assert out.affinity.shape == (1, 20, 20) and out.grid == (4, 5)
    assert torch.allclose(out.affinity, out.affinity.transpose(1, 2), atol=1e-6)
    assert out.seg_logits.shape == (1, 4, 4, 5) and out.cam.shape == (1, 3, 4, 5)
    with pytest.raises(ValueError, match="attention_blocks=13"):
        build_from_spec(afa_spec(3, "vit_s14_focus", 14, attention_blocks=13))


def test_propagation_with_the_identity_affinity_returns_the_cam_scores():
    torch.manual_seed(0)
    cams = torch.rand(2, 3, 4, 5)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    eye = torch.eye(20).expand(2, 20, 20)
    out = propagate_cams(cams, eye, (4, 5), labels, bg_score=0.35, column_eps=0.0)
    keep = torch.cat([torch.ones(2, 1), labels], 1).bool()[:, :, None, None]
    scores = torch.cat([torch.full_like(cams[:, :1], 0.35), cams], 1).masked_fill(~keep, float("-inf")).softmax(1)
    assert torch.allclose(out, scores, atol=1e-6)
    assert float(out[0, 2].abs().max()) == 0.0                                # absent class stays 0
    # AFA's column offset 0.1: each column of the identity sums to 1, so the scores are divided by 1.1
    assert torch.allclose(propagate_cams(cams, eye, (4, 5), labels, 0.35), scores / 1.1, atol=1e-6)


def test_propagation_averages_over_the_window_by_squared_affinity():
    # 1 x 3 grid, one class, radius 1: position 2 is outside position 0's window
    cams = torch.tensor([[[[0.0, 1.0, 2.0]]]])
    aff = torch.tensor([[[1.0, 0.5, 0.9], [0.5, 1.0, 0.5], [0.9, 0.5, 1.0]]])
    out = propagate_cams(cams, aff, (1, 3), torch.ones(1, 1), bg_score=0.0, radius=1, column_eps=0.0)
    p = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 2.0]]).softmax(1)        # (positions, [bg, class])
    a = torch.tensor([[1.0, 0.25, 0.0], [0.25, 1.0, 0.25], [0.0, 0.25, 1.0]])  # masked, squared
    expected = (p.T @ a) / a.sum(0)
    assert torch.allclose(out[0].reshape(2, 3), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------ losses
def test_affinity_loss_is_half_mean_positive_plus_half_mean_negative():
    aff = torch.tensor([[[0.9, 0.2], [0.6, 0.3]]])
    pairs = torch.tensor([[[1, 0], [255, 1]]])
    loss, counts = afa_affinity_loss(aff, pairs)
    expected = 0.5 * ((1 - 0.9) + (1 - 0.3)) / 2 + 0.5 * 0.2 / 1
    assert float(loss) == pytest.approx(expected)
    assert counts == {"aff_pos": 2.0, "aff_neg": 1.0}


def test_segmentation_loss_weighs_background_and_foreground_halves():
    logits = torch.tensor([[[[2.0, 0.0, 1.0, 5.0]], [[0.0, 1.0, 1.0, -5.0]]]])       # (1, 2, 1, 4)
    label = torch.tensor([[[0, 1, 1, 255]]])
    ce = torch.nn.functional.cross_entropy(logits, label.clamp(max=1), reduction="none")[0, 0]
    expected = 0.5 * ce[0] + 0.5 * (ce[1] + ce[2]) / 2
    assert float(background_foreground_ce(logits, label)) == pytest.approx(float(expected))
    only_bg = torch.tensor([[[0, 0, 255, 255]]])                          # no foreground: that half is 0
    ce_bg = torch.nn.functional.cross_entropy(logits, torch.zeros_like(label), reduction="none")[0, 0]
    assert float(background_foreground_ce(logits, only_bg)) == pytest.approx(float(0.5 * (ce_bg[0] + ce_bg[1]) / 2))


# ------------------------------------------------------------------------------------------------ schedule
def test_schedule_switches_losses_at_the_stated_iterations():
    s = AFASchedule()                                        # AFA: 2000, 6000, 0.1, 0.1
    assert s.weights(0) == s.weights(1999) == (0.0, 0.0)
    assert s.weights(2000) == (0.1, 0.1)
    assert s.seg_target(5999) == "par" and s.seg_target(6000) == "propagated"
    model, x = _tiny_afa(), torch.randn(2, 3, 64, 64)
    labels, valid = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]), torch.ones(2, 64, 64)
    short = AFASchedule(cam_iters=2, propagate_iters=3)
    logged = {t: afa_losses(model, x, labels, valid, t, short, AFALabelParams(), PAR(), 0.5)[1] for t in (1, 2, 3)}
    assert set(logged[1]) == {"loss_cls"}
    assert {"loss_seg", "loss_aff"} <= set(logged[2]) and {"loss_seg", "loss_aff"} <= set(logged[3])


def test_one_training_step_lowers_the_loss_on_a_fixed_batch():
    from smaf.optim import build_adamw

    model = _tiny_afa(seed=1).eval()            # eval: no stochastic depth / dropout, so the loss is a function
    torch.manual_seed(2)
    x = torch.randn(2, 3, 64, 64)
    labels, valid = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), torch.ones(2, 64, 64)
    args = (x, labels, valid, 2500, AFASchedule(), AFALabelParams(), PAR(), 0.5)
    optimizer = build_adamw(model.param_groups(), lr=1e-4, weight_decay=0.01, max_step=10, warmup_iters=0)
    before, logs = afa_losses(model, *args)
    assert logs["loss_seg"] > 0 and logs["loss_aff"] > 0
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after, _ = afa_losses(model, *args)
    assert float(after) < float(before.detach())


def test_encoder_norms_are_frozen_and_new_layers_are_the_head_groups():
    model = _tiny_afa()
    assert all(not p.requires_grad for m in model.backbone.modules() if isinstance(m, torch.nn.LayerNorm)
               for p in m.parameters())
    groups = model.param_groups()
    new = {id(p) for g in groups[2:] for p in g}
    assert new == {id(p) for m in (model.classifier, model.affinity_head, model.decoder) for p in m.parameters()}


# ------------------------------------------------------------------------------------------------ stages
def _cfg(root: Path, work: Path, *extra: str):
    lst = root / "ImageSets" / "Segmentation"
    return load_config("demo", [f"work_dir={work}", f"data.root={root}", f"data.train_list={lst}/train.txt",
                                f"data.infer_list={lst}/train.txt", f"data.val_list={lst}/val.txt", "num_workers=0",
                                "train_afa.crop=64", "train_afa.iterations=4", "train_afa.cam_iters=1",
                                "train_afa.propagate_iters=2", "train_afa.ckpt_every=2", "train_afa.val_every=4",
                                "train_afa.log_every=2", "train_afa.batch_size=2", "train_afa.cam_scales=[1.0,1.5]",
                                "infer_afa.base_long=64", "infer_afa.scales=[1.0]", "infer_afa.crf_workers=1",
                                "infer_afa.overlays=1", *extra])


def test_train_afa_and_infer_afa_run_end_to_end(tiny_voc, tmp_path):
    from smaf.stages import infer_afa, train_afa

    cfg = _cfg(tiny_voc, tmp_path)
    final = train_afa.run(cfg)
    out = tmp_path / "train_afa"
    assert final == out / "final.pth" and final.is_file() and (out / "config.yaml").is_file()
    assert sorted(p.name for p in (out / "checkpoints").glob("iter_*.pth")) == ["iter_0000002.pth"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "loss" in r] == [2, 4]
    assert "loss_aff" in rows[-2] and any("val_miou" in r for r in rows)
    assert train_afa.run(cfg) == final                                     # finished: not trained again
    result = infer_afa.run(cfg)
    val = (tiny_voc / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    assert sorted(p.stem for p in result["png_dir"].glob("*.png")) == sorted(val)
    assert sorted(p.stem for p in result["crf_dir"].glob("*.png")) == sorted(val)
    assert result["miou"] is not None and result["miou_crf"] is not None
    assert (tmp_path / "infer_afa" / "eval" / "crf_png.json").is_file()
    from PIL import Image
    png = Image.open(result["png_dir"] / f"{val[0]}.png")
    assert png.mode == "P" and np.array(png).max() <= 5
    from smaf.predict import load_segmentation_model                    # python -m smaf.predict takes it too
    model, spec = load_segmentation_model(final, "cpu")
    assert spec["arch"] == "afa" and model(torch.zeros(1, 3, 64, 64)).shape == (1, 6, 16, 16)


def test_bad_afa_settings_are_one_line_config_errors(tiny_voc, tmp_path):
    from smaf.stages import train_afa

    with pytest.raises(ConfigError, match="train_afa.backbone='efficientnet_lite0'"):
        train_afa.run(_cfg(tiny_voc, tmp_path, "train_afa.backbone=efficientnet_lite0"))
    with pytest.raises(ConfigError, match="train_afa.bg_low"):
        train_afa.run(_cfg(tiny_voc, tmp_path, "train_afa.bg_low=0.7"))
    assert not (tmp_path / "train_afa").exists()                          # nothing written
    proc = subprocess.run([sys.executable, "-m", "smaf.stages.train_afa", "--config", "demo",
                           f"data.root={tiny_voc}", f"work_dir={tmp_path}", "train_afa.cam_iters=-1"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert "train_afa.cam_iters" in proc.stderr


def test_resize_long_draws_the_long_side_instead_of_rescaling_the_original(tiny_voc, tmp_path):
    from smaf.stages.train_afa import train_transform

    rng = np.random.default_rng(0)
    image = np.zeros((100, 200, 3), np.uint8)                               # long side 200
    sect = _cfg(tiny_voc, tmp_path, "train_afa.resize_long=[40,40]", "train_afa.crop=64").train_afa
    out = train_transform(sect)(rng, image)
    assert out["image"].shape == (3, 64, 64)
    assert out["valid"].sum() == 40 * 20                                    # 200 x 100 -> 40 x 20, then padded
    sect = _cfg(tiny_voc, tmp_path, "train_afa.scale_range=[0.25,0.25]", "train_afa.crop=64").train_afa
    assert train_transform(sect)(rng, image)["valid"].sum() == 50 * 25      # AFA's rule: the original x 0.25
    for bad in ("[40]", "[50,40]", "[a,b]"):
        with pytest.raises(ConfigError, match=r"train_afa.resize_long"):
            train_transform(_cfg(tiny_voc, tmp_path, f"train_afa.resize_long={bad}").train_afa)
