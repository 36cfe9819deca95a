"""Random walk (PSA): the transition matrix, its sparse and banded propagation, the presets, and the per-image
refiner over a folder of CAM dicts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from smaf.config import ConfigError, load_config
from smaf.refine.random_walk import (
    RandomWalkParams,
    RandomWalkRefiner,
    TransitionMatrix,
    disc_offsets,
    neighbour_affinities,
    propagate_banded,
    random_walk_grid,
    transition_weights,
)


def test_the_walk_neighbourhood_is_the_radius_5_disc():
    offsets = disc_offsets(5)
    assert len(offsets) == 68 and len(set(offsets)) == 68 and (0, 0) not in offsets
    assert all(dy * dy + dx * dx < 25 for dy, dx in offsets)


@pytest.mark.parametrize("method", ["sparse", "banded"])
def test_a_random_walk_with_an_identity_affinity_returns_the_input(method):
    torch.manual_seed(0)
    h, w = 7, 9
    # features so far apart that every a_ij (i != j) is exp(-1e4) = 0: A = identity
    f = (torch.arange(h * w, dtype=torch.float32) * 1e4).view(1, h, w).expand(4, h, w)
    v = torch.rand(3, h, w)
    assert neighbour_affinities(f).max() == 0
    torch.testing.assert_close(random_walk_grid(f, v, beta=8, logt=4, method=method), v, rtol=0, atol=0)
    w_self, w_nb = transition_weights(torch.zeros(68, h, w), beta=8)
    assert (w_self == 1).all() and (w_nb == 0).all()


def test_the_transition_matrix_is_column_stochastic_and_a_normalised_symmetric_affinity():
    torch.manual_seed(1)
    h, w = 6, 11
    f = torch.rand(8, h, w)
    tm = TransitionMatrix.from_features(f, beta=8)
    assert tm.transposed.layout == torch.sparse_csr                       # never dense
    assert tm.transposed._nnz() <= (len(disc_offsets(5)) + 1) * h * w
    t = tm.matrix().to_dense()
    assert (t >= 0).all()
    torch.testing.assert_close(t.sum(0), torch.ones(h * w), rtol=0, atol=1e-6)   # every column sums to 1
    # T = A D^-1 with A symmetric, unit diagonal, a_ij^beta within radius 5 and 0 beyond
    a = t * (1.0 / torch.diagonal(t)).unsqueeze(0)
    torch.testing.assert_close(a, a.t(), rtol=1e-5, atol=1e-7)
    ys, xs = torch.div(torch.arange(h * w), w, rounding_mode="floor"), torch.arange(h * w) % w
    far = (ys[:, None] - ys[None]) ** 2 + (xs[:, None] - xs[None]) ** 2 >= 25
    assert (t[far] == 0).all()
    i, j = 2 * w + 3, 3 * w + 5                                          # (2, 3) and (3, 5): offset (1, 2)
    expected = torch.exp(-(f[:, 2, 3] - f[:, 3, 5]).abs().mean()) ** 8
    assert a[i, j].item() == pytest.approx(expected.item(), rel=1e-4)


def test_sparse_and_banded_walks_agree_and_keep_constants_and_the_range():
    torch.manual_seed(2)
    f, v = torch.rand(16, 9, 12), torch.rand(4, 9, 12)
    v[0] = 0.27                                                           # a constant background channel
    sparse = random_walk_grid(f, v, beta=8, logt=5, method="sparse")
    banded = random_walk_grid(f, v, beta=8, logt=5, method="banded")
    torch.testing.assert_close(sparse, banded, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sparse[0], torch.full((9, 12), 0.27), rtol=0, atol=1e-5)
    assert sparse.min() >= v.min() - 1e-6 and sparse.max() <= v.max() + 1e-6
    one = TransitionMatrix.from_features(f, beta=8).propagate(v, 1)      # one step = V T
    t = TransitionMatrix.from_features(f, beta=8).matrix().to_dense()
    torch.testing.assert_close(one.reshape(4, -1), v.reshape(4, -1) @ t, rtol=1e-5, atol=1e-6)
    w_self, w_nb = transition_weights(neighbour_affinities(f), 8)
    torch.testing.assert_close(propagate_banded(v, w_self, w_nb, disc_offsets(5), 1), one, rtol=1e-5, atol=1e-6)


def test_the_psa_seam_ppc_and_smaf_presets():
    psa = RandomWalkParams.from_config(load_config("voc12", ["random_walk.preset=psa"]).random_walk)
    assert (psa.beta, psa.logt, psa.bg, psa.alpha, psa.radius) == (8, 8, "power", 16, 5)
    seam = RandomWalkParams.from_config(load_config("voc12", ["random_walk.preset=seam"]).random_walk)
    assert (seam.beta, seam.logt, seam.bg, seam.alpha) == (8, 6, "power", 6)
    ppc = RandomWalkParams.from_config(load_config("voc12", ["random_walk.preset=ppc"]).random_walk)
    assert (ppc.beta, ppc.logt, ppc.bg, ppc.bg_threshold) == (8, 6, "constant", 0.27)
    cfg = load_config("voc12", ["random_walk.smaf.logt=4"])
    assert cfg.random_walk.preset == "smaf" and "psa" not in cfg.random_walk
    assert RandomWalkParams.from_config(cfg.random_walk).logt == 4
    with pytest.raises(ConfigError, match=r"random_walk\.preset='nope'.*ppc, psa, seam, smaf"):
        load_config("voc12", ["random_walk.preset=nope"])
    with pytest.raises(ConfigError, match="random_walk.psa"):
        RandomWalkParams.from_config(load_config("voc12", ["random_walk.preset=psa",
                                                           "random_walk.psa.bg=x"]).random_walk)


class _MaskFeatures(torch.nn.Module):
    """A stand-in AffinityNet: features = the one-hot ground truth pooled to the stride-8 grid, so affinities are
    high inside a region and low across its outline."""

    def __init__(self):
        super().__init__()
        self.mask = None

    def forward(self, x):
        m = torch.from_numpy(self.mask.astype(np.int64))
        m[m == 255] = 0
        onehot = torch.nn.functional.one_hot(m, 8).permute(2, 0, 1)[None].float() * 30
        h, w = x.shape[-2:]
        return torch.nn.functional.adaptive_avg_pool2d(onehot, ((h + 7) // 8, (w + 7) // 8))


@pytest.mark.parametrize("bg", ["rule", "power", "constant"])
def test_the_refiner_walks_maps_to_image_size_labels_and_dicts(bg):
    from smaf.cam.background import BackgroundRule

    image = np.zeros((120, 180, 3), np.uint8)
    mask = np.zeros((120, 180), np.uint8)
    mask[16:104, 40:136] = 3                                              # (on the stride-8 grid)
    cams = {2: np.zeros((120, 180), np.float32)}
    cams[2][24:96, 48:128] = 0.8                                          # a map one cell short of the outline
    cams[2][48:72, 72:112] = 1.0                                          # with its peak inside
    net = _MaskFeatures()
    net.mask = mask
    refiner = RandomWalkRefiner(net, RandomWalkParams(logt=6, bg=bg, alpha=4, bg_threshold=0.1),
                                BackgroundRule("fixed", 0.3))
    label, walked = refiner.refine_scores(image, cams, [2])
    assert label.shape == (120, 180) and label.dtype == np.uint8 and set(np.unique(label)) <= {0, 3}
    assert sorted(walked) == [2] and walked[2].shape == (120, 180) and 0 <= walked[2].min() <= walked[2].max() <= 1
    assert (cams[2][mask == 3] > 0).mean() < 0.75
    assert (label[mask == 3] == 3).mean() > 0.85                          # the map spread to the outline...
    assert (label[mask == 0] == 0).mean() > 0.9                           # ...and not over the background
    assert (refiner(image, {}, []) == 0).all()
    with pytest.raises(ValueError, match="at image size"):
        refiner(image, {2: np.zeros((10, 10), np.float32)}, [2])


def test_the_refiner_resizes_to_base_long_and_back(tiny_voc, tmp_path):
    from smaf.data.voc import VOCLayout
    from smaf.io import load_cam_dict, load_label_png, save_cam_dict
    from smaf.models.registry import build_from_spec
    from smaf.refine import refine_folder

    layout = VOCLayout(tiny_voc)
    ids = layout.read_list(tiny_voc / "ImageSets" / "Segmentation" / "val.txt")[:3]
    for i in ids:
        mask = layout.load_mask(i)
        save_cam_dict(tmp_path / "cams" / f"{i}.npy", {c: (mask == c + 1).astype(np.float32)
                                                       for c in np.nonzero(layout.labels[i] > 0.5)[0]})
    torch.manual_seed(0)
    net = build_from_spec({"arch": "affinity_net", "args": {"backbone": "efficientnet_lite0", "output_stride": 16}})
    refiner = RandomWalkRefiner(net, RandomWalkParams(logt=2), base_long=120)
    assert refine_folder(layout, tmp_path / "cams", tmp_path / "png", ids, refiner, 1, npy_dir=tmp_path / "npy") == 3
    for i in ids:
        size = layout.load_mask(i).shape
        assert load_label_png(tmp_path / "png" / f"{i}.png").shape == size
        assert all(v.shape == size for v in load_cam_dict(tmp_path / "npy" / f"{i}.npy").values())


def test_random_walk_step_explains_a_missing_checkpoint_in_one_line(tiny_voc, tmp_path):
    import subprocess
    import sys

    from smaf.io import save_cam_dict
    from smaf.runtime import EXIT_EXPECTED_ERROR

    save_cam_dict(tmp_path / "cams" / "train_00000.npy", {0: np.zeros((4, 4), np.float32)})
    out = subprocess.run([sys.executable, "-m", "smaf.stages.random_walk", "--config", "demo", f"data.root={tiny_voc}",
                          f"work_dir={tmp_path / 'run'}", f"random_walk.cam_dir={tmp_path / 'cams'}"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == EXIT_EXPECTED_ERROR, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "train_aff/final.pth" in last and "train_aff.sh" in last


def test_the_refiner_steps_read_their_inputs_from_the_run_layout(tmp_path):
    from smaf.run_layout import RunLayout

    runs = RunLayout(load_config("demo", [f"work_dir={tmp_path}", "fusion.out_subdir=fus", "train_aff.out_subdir=aff"]))
    assert runs.input("par", "input_dir") == tmp_path / "fus" / "cam_npy"
    assert runs.input("train_aff", "cam_dir") == tmp_path / "fus" / "cam_npy"
    assert runs.input("random_walk", "cam_dir") == tmp_path / "fus" / "cam_npy"
    assert runs.input("random_walk", "checkpoint") == tmp_path / "aff" / "final.pth"
    assert runs.stage_dir("par") == tmp_path / "par" and runs.stage_dir("random_walk") == tmp_path / "random_walk"
    assert "train_aff.sh" in runs.producer("random_walk", "checkpoint")


def test_the_refiner_benchmark_times_par_and_the_walk():
    from smaf.bench.refine import bench_refiners, format_refiners, synthetic_inputs

    images, cams = synthetic_inputs(1, size=(48, 64), num_classes=2)
    assert images[0].shape == (48, 64, 3) and len(cams[0]) == 2
    out = bench_refiners(images, cams, device="cpu", repeats=1)
    for key in ("par", "rw_network", "rw_walk", "rw_total"):
        assert out[key]["images_per_s"] > 0 and len(out[key]["times_s"]) == 1
    assert out["rw_pass"] is None and out["rw_target_s"] == 2.0          # not VOC-sized: no verdict
    assert out["settings"]["rw"]["logt"] == 8 and "RW walk" in format_refiners(out)
    with pytest.raises(ValueError, match="as many CAM dicts as images"):
        bench_refiners(images, [], device="cpu")
