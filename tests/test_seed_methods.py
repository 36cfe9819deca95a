"""Stage-0 seed methods SEAM and PPC (docs/seed_methods.md): their losses against hand computations on tiny
tensors, the PCM, the network's auxiliary heads through a checkpoint, config errors, and one training step per
method that lowers its loss on a fixed synthetic batch."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from smaf.config import Config, ConfigError, load_config
from smaf.losses import (adaptive_min_pooling_loss, min_max_normalize, ppc_intra_view_loss, ppc_prototypes,
                         ppc_pseudo_labels_and_scores, prototype_nce, seam_consistency_losses)
from smaf.methods import get_method, method_names
from smaf.models.pcm import PixelCorrelationModule, keep_max_foreground, pcm_input

E = 1e-5


def grid(*rows):
    """(1, 1, h, w) float tensor from rows of numbers."""
    return torch.tensor([list(r) for r in rows], dtype=torch.float32)[None, None]


# ------------------------------------------------------------------------------------- SEAM pieces
def test_min_max_normalize_is_seams_formula_per_image_and_channel():
    x = torch.cat([grid((0, 1), (2, 3)), grid((5, 5), (5, 9))], 1)              # (1, 2, 2, 2)
    out = min_max_normalize(x)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 1 - E], [2 - E, 3 - E]]) / (3 + E))
    torch.testing.assert_close(out[0, 1], torch.tensor([[0.0, 0.0], [0.0, 4 - E]]) / (4 + E))
    torch.testing.assert_close(min_max_normalize(5 * x + 2), out)                # invariant to scale and shift


def test_keep_max_foreground_zeroes_losing_classes_and_leaves_the_background():
    cam = torch.tensor([0.2, 0.7, 0.5, 0.9]).view(1, 4, 1, 1)                   # 3 classes, background last
    assert keep_max_foreground(cam, -1).flatten().tolist() == pytest.approx([0.0, 0.7, 0.0, 0.9])
    # PPC esp's bug (background assumed first): class 0 is left alone, the background competes as a class
    assert keep_max_foreground(cam, 0).flatten().tolist() == pytest.approx([0.2, 0.0, 0.0, 0.9])


def test_pcm_input_normalises_sets_background_and_keeps_the_max_class():
    cam = torch.tensor([[[[2.0, -1.0]], [[1.0, 4.0]]]])                          # (1, C=2, 1, 2), cls head
    out = pcm_input(cam, has_background=False)
    c0 = [(2 - E) / (2 + E), 0.0]
    c1 = [(1 - E) / (4 + E), (4 - E) / (4 + E)]
    expected = [[c0[0], 0.0], [0.0, c1[1]], [1 - c0[0], 1 - c1[1]]]               # pixel 0: class 0 wins
    torch.testing.assert_close(out[0, :, 0], torch.tensor(expected))
    with_bg = torch.cat([cam, torch.full_like(cam[:, :1], 7.0)], 1)             # a C+1 head: its bg is replaced
    torch.testing.assert_close(pcm_input(with_bg, has_background=True), out)


def test_pcm_on_identical_pixels_averages_the_cam_over_the_image():
    torch.manual_seed(0)
    pcm = PixelCorrelationModule((4, 6))
    image = torch.ones(1, 3, 8, 8)
    levels = [torch.ones(1, 4, 4, 4), torch.ones(1, 6, 2, 2)]                    # another size: resized
    cam_in = torch.rand(1, 3, 4, 4)
    out = pcm(cam_in, image, levels)                                             # A = 1 / hw everywhere
    expected = cam_in.mean((2, 3), keepdim=True).expand_as(cam_in) * 16 / (16 + E)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)
    aff = pcm.affinity(torch.rand(1, 3, 8, 8), [torch.rand(1, 4, 4, 4), torch.rand(1, 6, 4, 4)], (4, 4))
    torch.testing.assert_close(aff.sum(1), torch.ones(1, 16), rtol=1e-4, atol=1e-4)
    assert (aff >= 0).all()


def test_adaptive_min_pooling_averages_the_lowest_quarter_of_the_per_pixel_max():
    x = torch.cat([grid((-1, 2), (3, 4)), grid((0.5, 0), (1, 5))], 1)            # max over channels: -1->0.5 ...
    # per-pixel max: [0.5, 2, 3, 5]; fraction 0.5 -> the 2 lowest: 0.5, 2 -> mean
    assert float(adaptive_min_pooling_loss(x, 0.5)) == pytest.approx((0.5 + 2) / 2)
    neg = -torch.ones(2, 1, 2, 2)                                                # ReLU: negatives count as 0
    assert float(adaptive_min_pooling_loss(neg, 0.25)) == 0.0


def test_seam_er_and_ecr_against_a_hand_computation():
    cam1 = torch.cat([grid((0, 1), (2, 3)), torch.zeros(1, 1, 2, 2)], 1)         # C=1, background last (ignored)
    cam2 = torch.cat([grid((3, 2), (1, 0)), torch.zeros(1, 1, 2, 2)], 1)
    flat = torch.ones(1, 2, 2, 2)                                                # PCM outputs constant -> norm 0
    y = torch.ones(1, 2)
    er, ecr = seam_consistency_losses(cam1, flat, cam2, flat, y, top_fraction=0.5)
    n1 = np.array([0, 1, 2, 3]) / 3.0
    n2 = n1[::-1]
    assert float(er) == pytest.approx(np.abs(n1 - n2).mean(), abs=1e-4)          # 2/3
    # ECR: |target - 0|; target of view 2 = [fg n2, bg 1 - n2], top 4 of 8 errors: 1, 1, 2/3, 2/3 (each way)
    assert float(ecr) == pytest.approx(2 * (1 + 1 + 2 / 3 + 2 / 3) / 4, abs=1e-4)


def test_seam_er_vanishes_for_equivariant_views_and_labels_mask_absent_classes():
    torch.manual_seed(0)
    cam1 = torch.rand(2, 4, 8, 8)
    cam2 = torch.nn.functional.interpolate(cam1, size=(4, 4), mode="bilinear", align_corners=True)
    rv = torch.rand(2, 4, 8, 8)
    rv2 = torch.nn.functional.interpolate(rv, size=(4, 4), mode="bilinear", align_corners=True)
    y = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 1]])
    # equivariance: view 2 = view 1 rescaled with the maps rescaled alike -> ER ~ 0 (normalising commutes
    # with bilinear resizing up to its min/max, which align_corners keeps on the corners of this map)
    er, _ = seam_consistency_losses(cam1 * 3, rv, cam2 * 3, rv2, y)
    assert float(er) < 0.05
    changed = cam2.clone()
    changed[0, 1] = 1 - changed[0, 1]                                            # an absent class differs
    er_masked, _ = seam_consistency_losses(cam1 * 3, rv, changed * 3, rv2, y)
    assert float(er_masked) == pytest.approx(float(er), abs=1e-6)


# ------------------------------------------------------------------------------------- PPC pieces
def test_ppc_pseudo_labels_use_a_constant_background_and_the_labels():
    rv = torch.stack([grid((0, 1), (2, 4))[0, 0], grid((4, 0), (0, 0))[0, 0], torch.zeros(2, 2)])[None]
    y_ext = torch.tensor([[1.0, 0.0, 1.0]])                                      # class 1 absent
    labels, scores = ppc_pseudo_labels_and_scores(rv, y_ext, bg_score=0.3)
    assert torch.equal(scores[0, 2], torch.full((2, 2), 0.3))
    # class 0 normalised: [0, ~.25, ~.5, ~1]; > 0.3 wins, else background (2); class 1 is masked out
    assert labels[0].tolist() == [[2, 2], [0, 0]]


def test_ppc_prototypes_are_score_weighted_means_of_the_batch_top_k():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, 0.0]]).t().reshape(1, 2, 2, 2)
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.2], [0.4, 0.4, 0.1, 0.3]]).reshape(1, 2, 2, 2)
    protos = ppc_prototypes(feats, scores, top_k=2)
    p0 = 0.9 * np.array([0, 1]) + 0.5 * np.array([1, 1])                          # pixels 1 and 2
    p1 = 0.4 * np.array([1, 0]) + 0.4 * np.array([0, 1])                          # pixels 0 and 1
    for got, want in zip(protos, (p0, p1)):
        np.testing.assert_allclose(got.numpy(), want / np.linalg.norm(want), rtol=1e-5)


def test_prototype_nce_is_cross_entropy_over_all_prototypes():
    z = torch.tensor([[3.0, 4.0], [0.0, 2.0]]).t().reshape(1, 2, 1, 2)            # two pixels
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([[[0, 1]]])
    z1, z2 = np.array([0.6, 0.8]), np.array([0.0, 1.0])
    def nll(zp, k):
        logits = protos.numpy() @ zp / 0.1
        return -(logits[k] - np.log(np.exp(logits).sum()))
    assert float(prototype_nce(z, labels, protos, 0.1)) == pytest.approx((nll(z1, 0) + nll(z2, 1)) / 2, rel=1e-5)


def test_ppc_intra_view_mines_semi_hard_prototypes():
    torch.manual_seed(0)
    protos = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    z = torch.randn(1, 4, 1, 3)
    labels = torch.tensor([[[2, 2, 2]]])
    # every pixel once: no random share, the hard band = all of them (sorted order does not change the mean)
    got = ppc_intra_view_loss(z, labels, protos, 0.1, skip_hardest_negatives=1, top_negatives=3,
                              random_fraction=0.0, hard_band=(0.0, 1.0))
    zn = torch.nn.functional.normalize(z, dim=1)[0, :, 0].t()                     # (3, 4)
    losses = []
    for pixel in zn:
        logits = (protos @ pixel / 0.1).tolist()
        pos = logits[2]
        negs = sorted(logits[:2] + logits[3:], reverse=True)[1:3]                 # ranks 2..3
        losses.append(-(pos - math.log(sum(math.exp(v) for v in [pos] + negs))))
    assert float(got) == pytest.approx(np.mean(losses), rel=1e-5)
    # fewer negatives than the skip: all negatives are used instead (never a vanishing term)
    small = ppc_intra_view_loss(z, torch.zeros(1, 1, 3, dtype=torch.long), protos[:2], 0.1, 3, 13, 0.0, (0.0, 1.0))
    assert float(small) > 0


def test_ppc_hard_pixel_sampling_takes_the_band_after_the_hardest_tenth():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    angles = torch.linspace(0, 1.5, 20)                                          # similarity to class 0 falls
    z = torch.stack([torch.cos(angles), torch.sin(angles)]).reshape(1, 2, 1, 20)
    labels = torch.zeros(1, 1, 20, dtype=torch.long)
    got = ppc_intra_view_loss(z, labels, protos, 0.1, 0, 13, random_fraction=0.0)
    zn = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    logits = zn @ protos.t() / 0.1
    per_pixel = torch.logsumexp(logits, 1) - logits[:, 0]
    band = per_pixel.flip(0)[2:12]                                               # ascending similarity, [10%, 60%)
    assert float(got) == pytest.approx(float(band.mean()), rel=1e-5)


# ------------------------------------------------------------------------------------- methods, configs
def test_the_new_methods_are_listed_and_bring_their_config():
    assert {"cam", "eps", "seam", "ppc", "sc_cam"} <= set(method_names())
    cfg = load_config("voc12", ["train_cls.method=ppc"])
    assert cfg.train_cls.ppc.base == "seam" and cfg.train_cls.ppc.seam.bg_score == pytest.approx(0.2)
    assert cfg.train_cls.ppc.eps.prototype_topk_divisor == 16 and cfg.train_cls.ppc.eps.reproduce_onehot_bug is False
    assert "seam" not in cfg.train_cls
    ppc = get_method("ppc")
    assert ppc.head_for(cfg.train_cls.ppc) == "cls" and not ppc.needs_saliency_for(cfg.train_cls.ppc)
    eps_cfg = load_config("voc12", ["train_cls.method=ppc", "train_cls.ppc.base=eps"])
    assert ppc.head_for(eps_cfg.train_cls.ppc) == "smaf" and ppc.needs_saliency_for(eps_cfg.train_cls.ppc)


@pytest.mark.parametrize("method, override, key", [
    ("seam", "train_cls.seam.view2_scale=1.5", "train_cls.seam.view2_scale"),
    ("seam", "train_cls.seam.ecr_top_fraction=0", "train_cls.seam.ecr_top_fraction"),
    ("ppc", "train_cls.ppc.base=psa", "train_cls.ppc.base"),
    ("ppc", "train_cls.ppc.temperature=-1", "train_cls.ppc.temperature"),
    ("ppc", "train_cls.ppc.bg_prototype=mean", "train_cls.ppc.bg_prototype"),
    ("ppc", "train_cls.ppc.semi_hard_skip=20", "train_cls.ppc.semi_hard_skip"),
    ("sc_cam", "train_cls.sc_cam.num_subcategories=0", "train_cls.sc_cam.num_subcategories"),
])
def test_bad_method_options_are_one_line_config_errors_naming_the_key(method, override, key):
    cfg = load_config("voc12", [f"train_cls.method={method}", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        get_method(method).check_options(cfg.train_cls[method], f"train_cls.{method}")
    assert "\n" not in str(err.value)


def test_aux_heads_round_trip_through_a_checkpoint_and_stage1_sees_the_usual_outputs(tmp_path):
    from smaf.checkpoint import load_model, save_checkpoint
    from smaf.models import build_model

    model_cfg = Config(dict(backbone="efficientnet_lite0", pretrained="", output_stride=16, feat_dim=8, head="cls"))
    model = build_model(model_cfg, 3, {"pcm": True, "projection_dim": 4}).eval()
    save_checkpoint(tmp_path / "m.pth", model, iteration=0)
    loaded, spec = load_model(tmp_path / "m.pth")
    assert spec["args"]["pcm"] is True and spec["args"]["projection_dim"] == 4
    x = torch.rand(1, 3, 48, 48)
    out = loaded(x)
    assert len(out) == 3 and out[1].shape == (1, 3, 3, 3)                        # what stage 1 reads
    *_, aux = loaded(x, aux=True)
    assert aux["cam_rv"].shape == (1, 4, 3, 3) and aux["projection"].shape == (1, 4, 3, 3)
    assert {"conv4", "conv6"} <= set(aux["backbone"])
    heads = {id(p) for m in loaded.head_modules() for p in m.parameters()}
    assert all(id(p) in heads for p in loaded.pcm.parameters())                 # trained at 10x / 20x lr


# ------------------------------------------------------------------------------------- training steps
@pytest.fixture(scope="module")
def fixed_batch(tiny_voc):
    from smaf.data.transforms import JointTrainTransform
    from smaf.data.voc import ClassificationDataset, VOCLayout, collate_train

    layout = VOCLayout(tiny_voc)
    ids = layout.read_list(tiny_voc / "ImageSets/Segmentation/train.txt")[:4]
    dataset = ClassificationDataset(layout, ids, JointTrainTransform(64, (56, 96), jitter=(0.3, 0.3, 0.3, 0.1)),
                                    saliency=True)
    return collate_train([dataset[(i, 100 + i)] for i in range(4)]), layout.num_classes


def train_fixed_batch(method_name: str, overrides: list[str], batch, num_classes: int, steps: int = 8):
    from smaf.models import build_model
    from smaf.optim import build_poly_sgd

    cfg = load_config("demo", [f"train_cls.method={method_name}", *overrides])
    method, opts = get_method(method_name), cfg.train_cls[method_name]
    torch.manual_seed(0)
    model = build_model(Config(dict(cfg.model, head=method.head_for(opts))), num_classes,
                        method.aux_heads(opts)).train()
    optimizer = build_poly_sgd(model.param_groups(), lr=0.01, weight_decay=5e-4, momentum=0.0, max_step=1000)
    step = method.make_step(opts, num_classes, torch.device("cpu"))
    losses, logs = [], {}
    for it in range(steps):
        loss, logs = step(model, batch, it)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, logs


@pytest.mark.parametrize("method_name, overrides, terms", [
    ("seam", [], {"cls", "minpool", "er", "ecr"}),
    ("ppc", ["train_cls.ppc.view2_size=32"], {"cls", "ecr", "nce_cross_proto", "nce_cross_pseudo", "nce_intra"}),
    ("ppc", ["train_cls.ppc.base=eps", "train_cls.ppc.view2_size=32"], {"sal", "ecr", "nce_intra"}),
])
def test_one_step_runs_and_the_loss_falls_on_a_fixed_batch(fixed_batch, method_name, overrides, terms):
    batch, num_classes = fixed_batch
    losses, logs = train_fixed_batch(method_name, overrides, batch, num_classes)
    assert terms <= set(logs) and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
