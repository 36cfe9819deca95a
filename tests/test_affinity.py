"""AffinityNet (PSA): the pair offsets and source crop of the spec, the affinity loss against a hand computation,
the heads on both backbones, the la/ha affinity labels, the training samples, and a tiny end-to-end run (labels ->
training -> random walk) that improves its CAM mIoU on a synthetic set."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from smaf.config import load_config
from smaf.models.affinity import (
    AffinityNet,
    affinity_loss,
    build_affinity_net,
    grid_colour,
    pair_affinities,
    pair_labels,
    psa_offsets,
    source_crop,
    window_affinity_loss,
)
from smaf.refine.affinity_labels import AffinityLabelParams, affinity_label, crop_label, majority_downsample


# ------------------------------------------------------------------------------------------ pairs (spec §1.7)
def test_the_34_psa_offsets_and_the_source_crop_match_the_spec():
    offsets = psa_offsets(5)
    expected = [(0, dx) for dx in (1, 2, 3, 4)]
    expected += [(1, dx) for dx in range(-4, 5)] + [(2, dx) for dx in range(-4, 5)]
    expected += [(3, dx) for dx in range(-3, 4)] + [(4, dx) for dx in range(-2, 3)]
    assert offsets == expected and len(offsets) == 34
    assert all(dx * dx + dy * dy < 25 for dy, dx in offsets)
    # the half neighbourhood: with the negatives it is the whole disc, without overlap
    disc = {(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5) if 0 < dx * dx + dy * dy < 25}
    assert set(offsets) | {(-dy, -dx) for dy, dx in offsets} == disc and len(disc) == 68
    rows, cols = source_crop(56, 56)                 # a 448 crop: sources in rows [0:-4], columns [4:-4]
    assert (rows.start, rows.stop, cols.start, cols.stop) == (0, 52, 4, 52)
    with pytest.raises(ValueError, match="too small for affinity radius 5"):
        source_crop(4, 20)


def test_pair_affinities_are_exp_of_minus_the_mean_l1_feature_distance():
    torch.manual_seed(0)
    f = torch.rand(2, 6, 7, 11)
    aff = pair_affinities(f)
    assert aff.shape == (2, 34, 3, 3)                # sources: rows 0..2, columns 4..6
    for b in range(2):
        for p, (dy, dx) in enumerate(psa_offsets()):
            for y in range(3):
                for x in range(3):
                    src, dst = f[b, :, y, 4 + x], f[b, :, y + dy, 4 + x + dx]
                    assert aff[b, p, y, x].item() == pytest.approx(math.exp(-(src - dst).abs().mean().item()), rel=1e-5)


def test_the_affinity_loss_on_a_hand_made_pair_set_equals_a_hand_computation():
    # A 5 x 9 grid has one source, (0, 4); its 34 targets get chosen labels and affinities.
    label = torch.full((1, 5, 9), 0, dtype=torch.long)
    label[0, 0, 4] = 3                               # the source: class 2 (3 = c+1)
    label[0, 1, :] = 3                               # same class: fg positives
    label[0, 2, :3] = 255                            # unknown: no pair
    label[0, 2, 3:] = 5                              # another class: negatives
    # (rows 0, 3, 4 and the rest are background: negatives for a class-2 source)
    offsets = psa_offsets()
    aff = torch.tensor([(p + 1) / 40 for p in range(34)]).view(1, 34, 1, 1)
    fg_terms, neg_terms = [], []
    for p, (dy, dx) in enumerate(offsets):
        target = int(label[0, dy, 4 + dx])
        a = (p + 1) / 40
        if target == 255:
            continue
        if target == 3:
            fg_terms.append(-math.log(a + 1e-5))
        else:
            neg_terms.append(-math.log(1 + 1e-5 - a))
    fg = sum(fg_terms) / (len(fg_terms) + 1e-5)
    neg = sum(neg_terms) / (len(neg_terms) + 1e-5)
    loss, logs = affinity_loss(aff, label)
    assert len(fg_terms) == 9 and len(neg_terms) == 4 + 6 + 7 + 5 and logs["pairs_bg"] == 0
    assert loss.item() == pytest.approx(0.25 * 0.0 + 0.25 * fg + 0.5 * neg, rel=1e-6)
    assert logs["fg_pos"] == pytest.approx(fg, rel=1e-6) and logs["neg"] == pytest.approx(neg, rel=1e-6)
    # A background source: its background targets are the bg positives
    label[0, 0, 4] = 0
    bg_pos, fg_pos, neg = pair_labels(label)
    bg_terms = [-math.log((p + 1) / 40 + 1e-5) for p, (dy, dx) in enumerate(offsets) if int(label[0, dy, 4 + dx]) == 0]
    assert fg_pos.sum() == 0 and bg_pos.sum() == len(bg_terms) and neg.sum() == 34 - 3 - len(bg_terms)
    loss, logs = affinity_loss(aff, label)
    assert logs["bg_pos"] == pytest.approx(sum(bg_terms) / (len(bg_terms) + 1e-5), rel=1e-6)


# ---------------------------------------------------------------------------------------------- the network
@pytest.mark.parametrize("backbone,stride", [("efficientnet_lite0", 16), ("efficientnet_lite0", 8), ("resnet38d", 8)])
def test_affinity_net_gives_448_features_at_stride_8_on_both_backbones(backbone, stride):
    torch.manual_seed(0)
    net = build_affinity_net(backbone, stride).eval()
    with torch.no_grad():
        f = net(torch.randn(1, 3, 75, 100))
    assert f.shape == (1, 448, 10, 13) and (f > -1).all()          # ELU output
    groups = net.param_groups()
    head = {id(p) for m in net.head_modules() for p in m.parameters()}
    assert {id(p) for p in groups[2]} == head and not groups[1] and not groups[3]   # no biases in the head
    assert all(id(p) not in head for p in groups[0])
    if backbone == "resnet38d":
        assert [tuple(c.weight.shape[:2]) for c in net.level_convs] == [(64, 512), (128, 1024), (256, 4096)]
    assert tuple(net.fuse_conv.weight.shape[:2]) == (448, 448)


def test_an_affinity_net_checkpoint_rebuilds_it(tmp_path):
    from smaf.checkpoint import load_model, save_checkpoint
    from smaf.models.registry import build_from_spec

    torch.manual_seed(0)
    spec = {"arch": "affinity_net", "args": {"backbone": "efficientnet_lite0", "output_stride": 16}}
    net = build_from_spec(spec).eval()
    assert isinstance(net, AffinityNet)
    save_checkpoint(tmp_path / "aff.pth", net, iteration=1)
    rebuilt, got = load_model(tmp_path / "aff.pth")
    assert got == spec
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), net(x))


# ---------------------------------------------------------------------------------------------- the labels
def _ramp_cams(h=10, w=100):
    """One class whose map falls linearly from 1 (left) to 0 (right)."""
    return {2: np.tile(np.linspace(1, 0, w, dtype=np.float32), (h, 1))}


def test_la_ha_labels_keep_confident_foreground_and_background_and_leave_the_middle_unknown():
    image = np.zeros((10, 100, 3), np.uint8)
    m = _ramp_cams()[2][0]
    label = affinity_label(image, _ramp_cams(), AffinityLabelParams(crf=False))
    # la (alpha 4): foreground where (1 - m)^4 < m; ha (alpha 32): background where (1 - m)^32 > m
    fg, bg = m > (1 - m) ** 4, (1 - m) ** 32 >= m
    assert (label[:, fg] == 3).all() and (label[:, bg] == 0).all() and (label[:, ~fg & ~bg] == 255).all()
    assert fg.sum() > 5 and bg.sum() > 5 and (~fg & ~bg).sum() > 5
    scores = affinity_label(image, _ramp_cams(), AffinityLabelParams(mode="scores", bg_scores=(0.2, 0.6), crf=False))
    assert (scores[:, m > 0.6] == 3).all() and (scores[:, m < 0.2] == 0).all()
    assert (scores[:, (m > 0.2) & (m < 0.6)] == 255).all()
    from smaf.cam.background import BackgroundRule

    rule = affinity_label(image, _ramp_cams(), AffinityLabelParams(mode="rule", rule_margin=0.1, crf=False),
                          BackgroundRule("fixed", 0.5))
    assert (rule[:, m > 0.6] == 3).all() and (rule[:, m < 0.4] == 0).all()
    assert (rule[:, (m > 0.41) & (m < 0.59)] == 255).all()
    with_crf = affinity_label(np.full((10, 100, 3), 128, np.uint8), _ramp_cams(), AffinityLabelParams())
    assert set(np.unique(with_crf)) <= {0, 3, 255} and (with_crf[:, :5] == 3).all() and (with_crf[:, -1] == 0).all()
    assert (affinity_label(image, {}, AffinityLabelParams()) == 0).all()


def test_affinity_label_params_come_from_the_config():
    cfg = load_config("voc12")
    params = AffinityLabelParams.from_config(cfg.train_aff.labels)
    assert (params.mode, params.alpha_la, params.alpha_ha, params.crf) == ("power", 4.0, 32.0, True)
    assert (params.crf_params.bi_sxy, params.crf_params.bi_srgb, params.crf_params.bi_compat) == (80, 13, 10)
    from smaf.config import ConfigError

    with pytest.raises(ConfigError, match="train_aff.labels"):
        AffinityLabelParams.from_config(load_config("voc12", ["train_aff.labels.mode=nope"]).train_aff.labels)


def test_labels_follow_the_crop_and_vote_per_cell():
    label = np.zeros((16, 24), np.uint8)
    label[:, 12:] = 3
    label[:2, :8] = 255
    params = {"scaled_size": (16, 24), "flip": True, "crop": 32, "cont_top": 8, "cont_left": 0, "img_top": 0,
              "img_left": 0, "ch": 16, "cw": 24}
    crop = crop_label(label, params)
    assert (crop[:8] == 255).all() and (crop[:, 24:] == 255).all()
    np.testing.assert_array_equal(crop[8:24, :24], label[:, ::-1])
    grid = majority_downsample(crop, 8)
    assert grid.shape == (4, 4)
    np.testing.assert_array_equal(grid, [[255] * 4, [3, 0, 0, 255], [3, 0, 0, 255], [255] * 4])
    assert majority_downsample(np.array([[1, 1], [2, 2]], np.uint8), 2)[0, 0] == 1       # ties: the smaller


def test_affinity_dataset_gives_crops_and_grid_labels(tiny_voc, tmp_path):
    from smaf.data.transforms import JointTrainTransform
    from smaf.data.voc import DatasetError, VOCLayout
    from smaf.io import save_label_png
    from smaf.refine.affinity_labels import AffinityDataset

    layout = VOCLayout(tiny_voc)
    ids = layout.read_list(tiny_voc / "ImageSets" / "Segmentation" / "train.txt")[:3]
    for i in ids:
        save_label_png(tmp_path / f"{i}.png", layout.load_mask(i))
    data = AffinityDataset(layout, ids, JointTrainTransform(96, (64, 96)), tmp_path)
    item = data[(1, 7)]
    assert item["image"].shape == (3, 96, 96) and item["aff_label"].shape == (12, 12)
    assert item["aff_label"].dtype == torch.int64
    assert set(item["aff_label"].unique().tolist()) <= {0, 255} | {c + 1 for c in range(5)}
    assert torch.equal(data[(1, 7)]["aff_label"], item["aff_label"])          # the seed fixes the sample
    with pytest.raises(DatasetError, match="multiple of 8"):
        AffinityDataset(layout, ids, JointTrainTransform(100), tmp_path)
    with pytest.raises(DatasetError, match="affinity labels missing"):
        AffinityDataset(layout, ids + ["train_00011"], JointTrainTransform(96), tmp_path)


# ------------------------------------------------------------------- A2GNN's affinity CNN (spec §8, stage 2)
def test_window_affinity_loss_equals_a_pair_by_pair_computation():
    """Every ordered pair (i, j) with |dy|, |dx| <= r, both real nodes: PSA's three terms over the known labels and
    the gated-CRF term sum K_ij d_ij / pairs with K = exp(-|dxy|^2 64 / (2 xy^2) - |drgb|^2 / (2 rgb^2))."""
    g = torch.Generator().manual_seed(0)
    h, w, r, xy, sigma, weight = 4, 5, 2, 6.0, 0.3, 3.0
    f = torch.rand(1, 3, h, w, generator=g)
    rgb = torch.rand(1, 3, h, w, generator=g)
    label = torch.tensor([[[0, 0, 1, 1, 255], [0, 2, 1, 1, 255], [255, 2, 2, 0, 255], [0, 0, 2, 0, 255]]])
    valid = torch.ones(1, h, w, dtype=torch.bool)
    valid[0, :, 4] = False                                        # a padding column
    sums = {"bg": [0.0, 0], "fg": [0.0, 0], "neg": [0.0, 0]}
    gcrf, pairs = 0.0, 0
    for y in range(h):
        for x in range(w):
            for yy in range(max(0, y - r), min(h, y + r + 1)):
                for xx in range(max(0, x - r), min(w, x + r + 1)):
                    if (yy, xx) == (y, x) or not (valid[0, y, x] and valid[0, yy, xx]):
                        continue
                    d = float((f[0, :, y, x] - f[0, :, yy, xx]).abs().mean())
                    a = math.exp(-d)
                    pairs += 1
                    k = math.exp(-((yy - y) ** 2 + (xx - x) ** 2) * 64 / (2 * xy ** 2)
                                 - float(((rgb[0, :, y, x] - rgb[0, :, yy, xx]) ** 2).sum()) / (2 * sigma ** 2))
                    gcrf += k * d
                    li, lj = int(label[0, y, x]), int(label[0, yy, xx])
                    if 255 in (li, lj):
                        continue
                    kind = "neg" if li != lj else ("bg" if li == 0 else "fg")
                    sums[kind][0] += -math.log(1 + 1e-5 - a) if kind == "neg" else -math.log(a + 1e-5)
                    sums[kind][1] += 1
    terms = {k: v / (n + 1e-5) for k, (v, n) in sums.items()}
    expected_gcrf = gcrf / pairs
    loss, logs = window_affinity_loss(f, label, rgb, valid, r, weight, xy, sigma)
    assert logs["pairs_bg"] == sums["bg"][1] and logs["pairs_fg"] == sums["fg"][1] and logs["pairs_neg"] == sums["neg"][1]
    assert logs["bg_pos"] == pytest.approx(terms["bg"], rel=1e-5) and logs["neg"] == pytest.approx(terms["neg"], rel=1e-5)
    assert logs["fg_pos"] == pytest.approx(terms["fg"], rel=1e-5)
    assert logs["gcrf"] == pytest.approx(expected_gcrf, rel=1e-5)
    expected = terms["bg"] / 4 + terms["fg"] / 4 + terms["neg"] / 2 + weight * expected_gcrf
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # identical features: no distance, no gated term; the loss is what the negative pairs cost
    same, logs = window_affinity_loss(torch.ones(1, 3, h, w), label, rgb, valid, r, weight, xy, sigma)
    assert logs["gcrf"] == 0.0 and logs["neg"] == pytest.approx(-math.log(1e-5), rel=1e-3)   # (float32 1 + 1e-5)


def test_grid_colour_recovers_each_cells_colour_and_leaves_padding_out():
    from smaf.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    colours = torch.tensor([[0.2, 0.9], [0.5, 0.1]])                    # one grey level per 8 x 8 cell
    rgb01 = colours.repeat_interleave(8, 0).repeat_interleave(8, 1).expand(3, 16, 16).clone()
    valid = torch.ones(1, 16, 16)
    valid[0, 8:, 8:12] = 0                                              # half of the last cell is padding
    valid[0, :8, 13:] = 0                                               # a bit of the second cell (3/8)
    image = (rgb01 - torch.as_tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.as_tensor(IMAGENET_STD).view(3, 1, 1)
    image = image * valid                                               # padding is 0 after normalisation
    rgb, grid_valid = grid_colour(image[None], valid, 8)
    torch.testing.assert_close(rgb[0, 0], colours, atol=1e-5, rtol=0)  # the mean over the cell's image pixels
    assert grid_valid[0].tolist() == [[True, True], [True, False]]     # half or less image: not a node


def test_the_a2gnn_objective_trains_an_affinity_net_and_logs_its_gated_term(tiny_voc, tmp_path):
    import json

    from smaf.config import ConfigError
    from smaf.stages import train_aff

    lst = tiny_voc / "ImageSets" / "Segmentation" / "train.txt"
    cams = tmp_path / "cams"
    from smaf.data.voc import VOCLayout

    layout = VOCLayout(tiny_voc)
    _coarse_cams(layout, layout.read_list(lst), cams)

    def cfg(*extra):
        return load_config("demo", [f"data.root={tiny_voc}", f"data.train_list={lst}", f"work_dir={tmp_path / 'run'}",
                                    "num_workers=0", f"train_aff.cam_dir={cams}", "train_aff.crop=64",
                                    "train_aff.batch_size=4", "train_aff.iterations=6", "train_aff.log_every=1",
                                    "train_aff.optimizer=adamw", "train_aff.lr=0.002", "train_aff.label_workers=1",
                                    "train_aff.objective=a2gnn", *extra])

    for bad, key in (("train_aff.objective=gated", "train_aff.objective"),
                     ("train_aff.a2gnn.window_radius=0", "train_aff.a2gnn.window_radius"),
                     ("train_aff.a2gnn.gcrf_rgb=0", "train_aff.a2gnn.gcrf_rgb"),
                     ("train_aff.a2gnn.gcrf_weight=-1", "train_aff.a2gnn.gcrf_weight")):
        with pytest.raises(ConfigError, match=key.replace(".", "\\.")):
            train_aff.run(cfg(bad))
        assert not (tmp_path / "run").exists()                          # nothing written before the check
    final = train_aff.run(cfg())
    rows = [json.loads(line) for line in (final.parent / "metrics.jsonl").read_text().splitlines()]
    trained = [row for row in rows if "gcrf" in row]
    assert len(trained) == 6 and all(row["gcrf"] > 0 for row in trained)
    assert "A2GNN loss: window radius 3 + 3.0 x gated CRF" in (final.parent / "log.txt").read_text()


# ------------------------------------------------------------------------------------------------ end to end
def _coarse_cams(layout, ids, out_dir):
    """Seed-like maps: each object's distance transform (peaked inside, falling short of its outline)."""
    import cv2

    from smaf.io import save_cam_dict

    for i in ids:
        mask = layout.load_mask(i)
        cams = {}
        for c in np.nonzero(layout.labels[i] > 0.5)[0]:
            m = cv2.distanceTransform((mask == c + 1).astype(np.uint8), cv2.DIST_L2, 5).astype(np.float32)
            m = cv2.GaussianBlur(m, (0, 0), 3)
            cams[int(c)] = m / max(float(m.max()), 1e-5)
        save_cam_dict(out_dir / f"{i}.npy", cams)


@pytest.mark.cost(28)
def test_a_tiny_affinity_net_run_improves_the_cam_miou_of_a_synthetic_set(tmp_path):
    from smaf.cam.background import BackgroundRule
    from smaf.data.synthetic import make_synthetic_dataset
    from smaf.data.voc import VOCLayout
    from smaf.evaluate.folder import evaluate_folder
    from smaf.stages import random_walk, train_aff

    root = make_synthetic_dataset(tmp_path / "voc", num_train=12, num_val=2, seed=0, min_size=160, max_size=192,
                                  num_classes=5)
    layout = VOCLayout(root)
    lst = root / "ImageSets" / "Segmentation" / "train.txt"
    ids = layout.read_list(lst)
    _coarse_cams(layout, ids, tmp_path / "cams")
    cfg = load_config("demo", [f"data.root={root}", f"data.train_list={lst}", f"data.infer_list={lst}",
                               f"data.val_list={lst}", f"work_dir={tmp_path / 'run'}", "num_workers=0",
                               f"train_aff.cam_dir={tmp_path / 'cams'}", f"random_walk.cam_dir={tmp_path / 'cams'}",
                               "train_aff.crop=96", "train_aff.batch_size=4", "train_aff.iterations=40",
                               "train_aff.optimizer=adamw", "train_aff.lr=0.002", "train_aff.adamw.warmup_iters=5",
                               "train_aff.label_workers=1", "random_walk.smaf.logt=3"])
    names = ["background"] + layout.class_names
    before = evaluate_folder(tmp_path / "cams", layout.mask_dir, ids, names,
                             bg_threshold=BackgroundRule.from_section(cfg.inference, "inference"))["miou"]
    final = train_aff.run(cfg)
    assert final.is_file() and (tmp_path / "run" / "train_aff" / "aff_labels" / f"{ids[0]}.png").is_file()
    result = random_walk.run(cfg)
    assert result["refined"] == len(ids)
    # (measured: 71.6 -> 77.2; a short walk, t = 8, suits an affinity trained for 40 iterations)
    assert result["miou"] > before + 2, (before, result["miou"])
    assert len(list(result["npy_dir"].glob("*.npy"))) == len(ids)
