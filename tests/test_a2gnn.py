"""A2GNN: the affinity-attention layer against a dense reference, the per-image training on a separable toy graph,
padding, the box losses, the refiner and the stage."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from smaf.models.a2gnn import (AffinityAttention, GraphInput, TrainParams, collate_graphs, consistency_check,
                               gated_crf_kernel, gated_crf_loss, mil_loss, neighbour_stack, seed_loss, train_graphs,
                               window_aggregate, window_dots, window_mask, window_offsets)


def _dense_attention(x, f, valid, beta, radius, weight=10.0):
    """Reference: P = softmax_row(beta cos + weight A + M) over all N x N node pairs of one graph, M = -inf outside
    the square window, between non-nodes and where cos < 0; returns (P (N, N), P x (N, K)) over the real nodes."""
    k, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    keep = valid.flatten()
    ys, xs = ys.flatten()[keep], xs.flatten()[keep]
    nodes = x.flatten(1).t()[keep]                                     # (N, K)
    feats = f.flatten(1).t()[keep]
    cos = torch.nn.functional.normalize(nodes, dim=1) @ torch.nn.functional.normalize(nodes, dim=1).t()
    a = torch.exp(-(feats[:, None] - feats[None]).abs().mean(2))
    window = ((ys[:, None] - ys[None]).abs() <= radius) & ((xs[:, None] - xs[None]).abs() <= radius)
    logits = (beta * cos + weight * a).masked_fill(~window | (cos < 0), float("-inf"))
    p = torch.softmax(logits, 1)
    return p, p @ nodes


def test_the_attention_masking_matches_a_dense_reference():
    torch.manual_seed(0)
    radius, offsets = 2, window_offsets(2)
    assert len(offsets) == 25 and (0, 0) in offsets
    # two graphs on one padded grid: 5 x 7 and 4 x 5 (the second padded)
    graphs = [GraphInput(torch.randn(6, 5, 7), torch.rand(4, 5, 7), np.zeros((5, 7), np.uint8), torch.rand(3, 5, 7),
                         [0, 1], stride=1),
              GraphInput(torch.randn(6, 4, 5), torch.rand(4, 4, 5), np.zeros((4, 5), np.uint8), torch.rand(3, 4, 5),
                         [0, 1], stride=1)]
    batch = collate_graphs(graphs, radius, 2)
    layer = AffinityAttention(2)
    x = batch.features                                                  # signed: some cosines are negative
    layer.requires_grad_(False)
    p = layer.attention(x, batch.adjacency, batch.window, batch.offsets)
    out = layer(x, batch.adjacency, batch.window, batch.offsets)
    for g in range(2):
        valid = batch.valid[g]
        f = graphs[g].affinity_features
        f = torch.nn.functional.pad(f, (0, 7 - f.shape[-1], 0, 5 - f.shape[-2]))   # on the batch's grid
        ref_p, ref_out = _dense_attention(x[g], f, valid, layer.beta[g], radius)
        torch.testing.assert_close(out[g].flatten(1).t()[valid.flatten()], ref_out, rtol=1e-5, atol=1e-6)
        # the banded weights are the dense rows: entry (i, i + o)
        h, w = valid.shape
        index = -torch.ones(h, w, dtype=torch.long)
        index[valid] = torch.arange(int(valid.sum()))
        for o, (dy, dx) in enumerate(offsets):
            for yy in range(h):
                for xx in range(w):
                    if not valid[yy, xx]:
                        assert p[g, :, yy, xx].sum() == 0                  # padding nodes: no edges
                        continue
                    ty, tx = yy + dy, xx + dx
                    inside = 0 <= ty < h and 0 <= tx < w and bool(valid[ty, tx])
                    expected = ref_p[index[yy, xx], index[ty, tx]] if inside else 0.0
                    assert float(p[g, o, yy, xx]) == pytest.approx(float(expected), abs=1e-6)
    assert (p[1][:, batch.valid[1]].sum(0) - 1).abs().max() < 1e-5
    assert bool((p == 0).any())                                          # negative cosines are masked


def _toy_graphs(count=2, size=(6, 8)):
    """Separable toy graphs: left half class 1, right half background (features one-hot + noise, the affinity
    features the same), two seeds per side; the second graph is smaller (padded in the batch)."""
    out = []
    gen = torch.Generator().manual_seed(0)
    for g in range(count):
        h, w = size[0] - g, size[1] - 2 * g
        truth = torch.zeros(h, w, dtype=torch.long)
        truth[:, : w // 2] = 1
        feats = torch.nn.functional.one_hot(truth, 8).permute(2, 0, 1).float() + 0.3 * torch.rand(8, h, w,
                                                                                                generator=gen)
        seeds = np.full((h, w), 255, np.uint8)
        seeds[1, 0] = seeds[h - 2, 1] = 1
        seeds[0, w - 1] = seeds[h - 1, w - 2] = 0
        out.append((GraphInput(feats, feats.clone(), seeds, torch.full((3, h, w), 0.5), [0, 1], stride=1), truth))
    return out


def test_window_dots_and_aggregate_and_their_gradients_match_the_stacked_shifts():
    """The per-offset window operations (and their hand-written backward passes) against autograd through a
    stack of every shifted copy, on a non-square grid with an asymmetric window."""
    torch.manual_seed(0)
    offsets = [(-2, 1), (0, 0), (1, -1), (0, 2), (2, 2)]
    a = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    p = torch.randn(2, len(offsets), 4, 5, dtype=torch.float64, requires_grad=True)
    ref_dots = (a.unsqueeze(1) * neighbour_stack(b, offsets)).sum(2)
    ref_agg = (p.unsqueeze(2) * neighbour_stack(b, offsets)).sum(1)
    assert torch.allclose(window_dots(a, b, offsets), ref_dots)
    assert torch.allclose(window_aggregate(p, b, offsets), ref_agg)
    # a hand check of one entry: node (1, 1) and offset (2, 2) -> node (3, 3); offset (-2, 1) leaves the grid
    assert torch.isclose(window_dots(a, b, offsets)[0, 4, 1, 1], (a[0, :, 1, 1] * b[0, :, 3, 3]).sum())
    assert float(window_dots(a, b, offsets)[0, 0, 1, 1].detach()) == 0.0
    weights_out = torch.randn_like(ref_dots)
    weights_agg = torch.randn_like(ref_agg)
    for ours, ref, w in ((window_dots(a, b, offsets), ref_dots, weights_out),
                         (window_aggregate(p, b, offsets), ref_agg, weights_agg)):
        inputs = (a, b, p)
        got = torch.autograd.grad((ours * w).sum(), inputs, allow_unused=True, retain_graph=True)
        want = torch.autograd.grad((ref * w).sum(), inputs, allow_unused=True, retain_graph=True)
        for g_got, g_want in zip(got, want):
            assert (g_got is None) == (g_want is None)
            if g_got is not None:
                assert torch.allclose(g_got, g_want)
    assert torch.autograd.gradcheck(lambda x, y: window_dots(x, y, offsets), (a, b))
    assert torch.autograd.gradcheck(lambda q, y: window_aggregate(q, y, offsets), (p, b))


def test_per_image_training_lowers_its_loss_and_fits_a_separable_toy_graph():
    toy = _toy_graphs()
    batch = collate_graphs([g for g, _ in toy], 2, 3)
    params = TrainParams(epochs=40, lr=0.03, hidden=32, gcrf_xy=6.0)
    probs, logs = train_graphs(batch, params, seed=0)
    assert probs.shape == (2, 3, 6, 8)
    assert logs["loss_a"][-1] < 0.5 * logs["loss_a"][0]
    assert logs["loss_b"][-1] < 0.5 * logs["loss_a"][0]                # phase B (+ gated CRF) stays fitted
    for g, (_, truth) in enumerate(toy):
        h, w = truth.shape
        assert torch.equal(probs[g, :, :h, :w].argmax(0), truth)         # every node, from 4 seeds
        assert float(probs[g, 2].max()) < 1e-3                            # a label the image does not have
        assert float(probs[g, :, h:].abs().sum() + probs[g, :, :, w:].abs().sum()) == 0   # padding nodes


def test_padding_is_ignored_by_the_seed_loss():
    torch.manual_seed(0)
    small = _toy_graphs(2)[1][0]
    batch = collate_graphs([_toy_graphs(1)[0][0], small], 2, 3)
    h, w = small.seeds.shape
    assert (batch.seeds[1, h:] == 255).all() and (batch.seeds[1, :, w:] == 255).all()
    logits = torch.randn(2, 3, *batch.seeds.shape[1:])
    loss = seed_loss(logits, batch.seeds)
    alone = seed_loss(logits[1:, :, :h, :w], torch.from_numpy(small.seeds.astype(np.int64))[None])
    torch.testing.assert_close(loss[1:], alone)                       # padded pixels add nothing
    logits[1, 1, h:] = 100.0                                             # confident, wrong for background
    torch.testing.assert_close(seed_loss(logits, batch.seeds)[1:], alone)
    wrong = batch.seeds.clone()
    wrong[1, h:] = 0                                                     # the reference's bug: padding = background
    assert float(seed_loss(logits, wrong)[1]) > float(alone) + 1.0


def test_gated_crf_loss_is_zero_for_agreeing_neighbours_and_counts_colour_edges():
    valid = torch.ones(1, 4, 6, dtype=torch.bool)
    rgb = torch.zeros(1, 3, 4, 6)
    rgb[..., 3:] = 1.0                                                   # a colour edge between columns 2 and 3
    kernel, offsets = gated_crf_kernel(rgb, valid, radius=2, xy=6.0, rgb_sigma=0.1, stride=8)
    pairs = window_mask(valid, offsets).float().sum((1, 2, 3))
    flat = torch.zeros(1, 2, 4, 6)
    flat[:, 0] = 1
    assert float(gated_crf_loss(flat, kernel, offsets, pairs)) == 0
    split_on_edge, split_off_edge = flat.clone(), flat.clone()
    split_on_edge[:, :, :, 3:] = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    split_off_edge[:, :, :, 2:] = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    assert float(gated_crf_loss(split_on_edge, kernel, offsets, pairs)) < 1e-6    # across the colour edge
    assert float(gated_crf_loss(split_off_edge, kernel, offsets, pairs)) > 1e-3   # inside a flat region


def test_the_box_mil_loss_and_consistency_check():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 5, 6, requires_grad=True)
    hidden = torch.rand(1, 4, 5, 6, requires_grad=True)
    loss = mil_loss(logits, hidden, [[(2, 1, 1, 3, 4)]])
    loss.sum().backward()
    assert float(loss.detach()) > 0 and logits.grad.abs().sum() > 0 and hidden.grad.abs().sum() > 0
    assert float(mil_loss(logits, hidden, [[]])) == 0
    # consistency: box seeds whose output vector points away from the box prototype become 255
    up = torch.zeros(1, 3, 10, 12)
    up[0, 2] = 1.0
    up[0, :, 2:4, 2:4] = torch.tensor([0.0, 0.0, -1.0]).view(3, 1, 1)
    seeds = torch.full((1, 10, 12), 2, dtype=torch.int64)
    dropped = consistency_check(up, seeds, [[(2, 0, 0, 4, 5)]], stride=2)
    assert dropped == 4 and (seeds[0, 2:4, 2:4] == 255).all() and (seeds == 255).sum() == 4


def _tiny_affinity_net():
    from smaf.models.registry import build_from_spec

    torch.manual_seed(0)
    return build_from_spec({"arch": "affinity_net", "args": {"backbone": "efficientnet_lite0", "output_stride": 16}})


def test_the_refiner_turns_seeds_into_image_size_masks():
    from smaf.refine.a2gnn import A2GNNParams, A2GNNRefiner
    from smaf.refine.a2gnn_boxes import Box

    image = np.zeros((60, 84, 3), np.uint8)
    image[10:50, 10:40] = 220
    cams = {3: np.zeros((60, 84), np.float32)}
    cams[3][10:50, 10:40] = np.linspace(0.3, 1.0, 30, dtype=np.float32)[None]
    params = A2GNNParams(TrainParams(epochs=3, hidden=16))
    refiner = A2GNNRefiner(_tiny_affinity_net(), params, num_classes=5)
    label, scores = refiner.refine_scores(image, cams, [3])
    assert label.shape == (60, 84) and label.dtype == np.uint8 and set(np.unique(label)) <= {0, 4}
    assert sorted(scores) == [3] and scores[3].shape == (60, 84)
    seeds = np.zeros((60, 84), np.uint8)
    seeds[10:50, 10:40] = 2
    results, logs = refiner.refine_batch([
        {"image": image, "seeds": seeds, "classes": [1], "boxes": [Box(1, 10, 10, 39, 49)]},
        {"image": image[:40, :50], "seeds": seeds[:40, :50], "classes": [1]}])
    assert [r[0].shape for r in results] == [(60, 84), (40, 50)] and logs["dropped_seeds"] >= 0


def test_the_a2gnn_stage_runs_on_a_cam_folder_and_writes_its_config(tiny_voc, tmp_path):
    from smaf.checkpoint import save_checkpoint
    from smaf.config import ConfigError, load_config
    from smaf.data.voc import VOCLayout
    from smaf.io import load_label_png, save_cam_dict
    from smaf.stages.a2gnn import run

    layout = VOCLayout(tiny_voc)
    ids = layout.read_list(tiny_voc / "ImageSets" / "Segmentation" / "val.txt")[:2]
    for i in ids:
        mask = layout.load_mask(i)
        save_cam_dict(tmp_path / "cams" / f"{i}.npy", {int(c): (mask == c + 1).astype(np.float32) * 0.9
                                                       for c in np.nonzero(layout.labels[i] > 0.5)[0]})
    save_checkpoint(tmp_path / "aff.pth", _tiny_affinity_net())
    common = [f"data.root={tiny_voc}", f"work_dir={tmp_path / 'run'}", f"a2gnn.checkpoint={tmp_path / 'aff.pth'}",
              "a2gnn.seed_workers=1", "a2gnn.hidden=16", "a2gnn.crf=false", "a2gnn.seeds.crf=false", "device=cpu",
              f"a2gnn.eval_list={tiny_voc / 'ImageSets' / 'Segmentation' / 'val.txt'}"]
    out = run(load_config("demo", common + [f"a2gnn.cam_dir={tmp_path / 'cams'}", "a2gnn.image.epochs=2",
                                            "a2gnn.overlays=1"]))
    assert out["refined"] == 2 and (out["out_dir"] / "config.yaml").is_file()
    for i in ids:
        assert load_label_png(out["png_dir"] / f"{i}.png").shape == layout.load_mask(i).shape
        assert (out["seed_dir"] / f"{i}.png").is_file()
    (tmp_path / "ids.txt").write_text("\n".join(ids) + "\n")
    boxed = run(load_config("demo", common + ["a2gnn.preset=box", "a2gnn.box_dir=masks", "a2gnn.out_subdir=box",
                                              "a2gnn.box.epochs=2", f"a2gnn.list={tmp_path / 'ids.txt'}"]))
    assert boxed["refined"] == 2 and (boxed["out_dir"] / "boxes" / f"{ids[0]}.txt").is_file()
    # one-line errors
    bad = subprocess.run([sys.executable, "-m", "smaf.stages.a2gnn", "--config", "demo", f"data.root={tiny_voc}",
                          f"work_dir={tmp_path / 'run2'}", f"a2gnn.cam_dir={tmp_path / 'cams'}"],
                         capture_output=True, text=True, check=False)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and last.startswith("error:") and "train_aff" in last
    with pytest.raises(ConfigError, match="box_dir"):
        run(load_config("demo", common + ["a2gnn.preset=box"]))


def test_the_a2gnn_benchmark_times_an_epoch_and_both_forms_of_the_window_operations():
    from smaf.bench.refine import bench_a2gnn, format_a2gnn

    out = bench_a2gnn(grid=(6, 8), device="cpu", repeats=2, epochs=1)
    assert out["grid"] == [6, 8] and len(out["epoch"]["times_s"]) == 2
    assert out["layer_windowed"]["seconds_per_image"] > 0 and out["layer_stacked"]["seconds_per_image"] > 0
    assert out["layer_speedup"] == pytest.approx(out["layer_stacked"]["seconds_per_image"]
                                                 / out["layer_windowed"]["seconds_per_image"])
    assert out["image_s_at_spec"] == pytest.approx(100 * out["epoch"]["seconds_per_image"])
    assert "6 x 8 nodes" in format_a2gnn(out)
