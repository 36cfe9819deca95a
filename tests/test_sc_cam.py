"""SC-CAM (docs/seed_methods.md): sub-category labels from cluster ids (multi-label images included), k-means
determinism, the loss, one training step, and the round loop that skips finished rounds after an interruption."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from smaf.config import Config, ConfigError, load_config
from smaf.losses import multilabel_soft_margin, sc_cam_loss, subcategory_targets
from smaf.methods import get_method
from smaf.methods.sc_cam import (LABELS_FILE, cluster_subcategories, labels_from_clusters, read_subcategory_labels,
                                 write_subcategory_labels)


def test_subcategory_targets_set_one_bit_per_image_class_pair():
    # 3 images, C = 2 classes, K = 3: image 1 has both classes (in both clusterings)
    cluster_ids = {0: ([0, 1], [2, 0]), 1: ([1, 2], [1, 1])}
    out = subcategory_targets(cluster_ids, 3, 2, 3)
    expected = torch.tensor([[0, 0, 1, 0, 0, 0],
                             [1, 0, 0, 0, 1, 0],
                             [0, 0, 0, 0, 1, 0]], dtype=torch.float32)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="cluster ids"):
        subcategory_targets({0: ([0], [3])}, 1, 2, 3)


def test_labels_from_cluster_table_match_the_targets():
    clusters = np.array([[2, -1], [0, 1], [-1, 1]])
    labels = labels_from_clusters(clusters, 3)
    assert labels.dtype == np.uint8 and labels.sum(1).tolist() == [1, 2, 1]
    assert np.flatnonzero(labels[1]).tolist() == [0, 4]


def test_kmeans_labels_are_deterministic_for_a_seed_and_follow_the_classes():
    rng = np.random.default_rng(0)
    features = np.concatenate([rng.normal(0, 1, (10, 5)), rng.normal(8, 1, (10, 5))]).astype(np.float32)
    labels = np.zeros((20, 3), np.float32)
    labels[:, 0] = 1                 # every image has class 0
    labels[5:8, 1] = 1               # 3 images of class 1: fewer than K -> one cluster each
    a = cluster_subcategories(features, labels, 4, seed=0)
    b = cluster_subcategories(features, labels, 4, seed=0)
    assert np.array_equal(a, b)
    assert (a[:, 0] >= 0).all() and set(a[:, 0]) <= set(range(4))
    assert sorted(a[5:8, 1]) == [0, 1, 2] and (a[np.r_[0:5, 8:20], 1] == -1).all()
    assert (a[:, 2] == -1).all()                                                  # absent class: no cluster
    assert set(a[:10, 0]).isdisjoint(set(a[10:, 0]))                              # the two blobs never mix


def test_sc_cam_loss_is_parent_plus_five_times_the_subcategory_term():
    torch.manual_seed(0)
    logits, sub_logits = torch.randn(2, 3), torch.randn(2, 6)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    sub_labels = torch.tensor([[0, 1.0, 0, 0, 1, 0], [0, 0, 1.0, 0, 0, 0]])
    total, parent, sub = sc_cam_loss(logits, labels, sub_logits, sub_labels, 5.0)
    def mlsm(x, y):   # the hand formula: mean over classes of BCE with logits
        return float(-(y * torch.log(torch.sigmoid(x)) + (1 - y) * torch.log(1 - torch.sigmoid(x))).mean())
    assert float(parent) == pytest.approx(mlsm(logits, labels), rel=1e-5)
    assert float(sub) == pytest.approx(mlsm(sub_logits, sub_labels), rel=1e-5)
    assert float(total) == pytest.approx(float(multilabel_soft_margin(logits, labels)) + 5 * float(sub), rel=1e-6)


def _tiny_cfg(root, work_dir, *extra):
    lst = f"{root}/ImageSets/Segmentation"
    return load_config("demo", [
        f"work_dir={work_dir}", f"data.root={root}", f"data.train_list={lst}/train.txt",
        f"data.infer_list={lst}/train.txt", f"data.val_list={lst}/val.txt", "num_workers=0",
        "train_cls.method=sc_cam", "train_cls.crop=64", "train_cls.resize_long=[56,96]", "train_cls.batch_size=4",
        "train_cls.iterations=2", "train_cls.ckpt_every=1", "train_cls.val_every=0", "train_cls.log_every=1",
        "train_cls.sc_cam.rounds=2", "train_cls.sc_cam.num_subcategories=2", "train_cls.sc_cam.kmeans_n_init=2",
        "inference.base_long=64", *extra])


def test_one_step_runs_and_the_loss_falls_on_a_fixed_batch(tiny_voc, tmp_path):
    from smaf.data.transforms import JointTrainTransform
    from smaf.data.voc import ClassificationDataset, VOCLayout, collate_train
    from smaf.models import build_model
    from smaf.optim import build_poly_sgd

    layout = VOCLayout(tiny_voc)
    ids = layout.read_list(tiny_voc / "ImageSets/Segmentation/train.txt")
    labels = np.stack([layout.labels[i] for i in ids])
    clusters = cluster_subcategories(np.random.default_rng(0).normal(size=(len(ids), 8)), labels, 2)
    path = write_subcategory_labels(tmp_path / LABELS_FILE, ids, clusters, 2)
    assert set(read_subcategory_labels(path, layout.num_classes, 2, "x")) == set(ids)
    with pytest.raises(ConfigError, match="num_subcategories=3"):
        read_subcategory_labels(path, layout.num_classes, 3, "train_cls.sc_cam")

    cfg = _tiny_cfg(tiny_voc, tmp_path, f"train_cls.sc_cam.labels_file={path}")
    method, opts = get_method("sc_cam"), cfg.train_cls.sc_cam
    dataset = ClassificationDataset(layout, ids[:4], JointTrainTransform(64, (56, 96)))
    batch = collate_train([dataset[(i, 100 + i)] for i in range(4)])
    torch.manual_seed(0)
    model = build_model(Config(dict(cfg.model, head=method.head_for(opts))), layout.num_classes,
                        method.aux_heads(opts)).train()
    optimizer = build_poly_sgd(model.param_groups(), lr=0.01, weight_decay=5e-4, momentum=0.0, max_step=1000)
    step = method.make_step(opts, layout.num_classes, torch.device("cpu"))
    losses = []
    for it in range(8):
        loss, logs = step(model, batch, it)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert {"cls", "sub"} <= set(logs)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


class Interrupted(Exception):
    pass


def test_the_round_loop_resumes_after_an_interruption_between_rounds(tiny_voc, tmp_path):
    from smaf.stages import train_cls

    cfg = _tiny_cfg(tiny_voc, tmp_path)
    trained = []

    def interrupt_before_round_2(round_cfg):
        if round_cfg.train_cls.out_subdir.endswith("round_2"):
            raise Interrupted
        trained.append(round_cfg.train_cls.out_subdir)
        return train_cls.train_classifier(round_cfg)

    from smaf.methods.sc_cam import run_rounds

    with pytest.raises(Interrupted):
        run_rounds(cfg, interrupt_before_round_2)
    root = tmp_path / "train_cls"
    assert trained == ["train_cls/round_0", "train_cls/round_1"]
    labels_1 = root / "round_1" / LABELS_FILE
    stamp = labels_1.stat().st_mtime_ns
    assert (root / "round_2" / LABELS_FILE).is_file() and not (root / "final.pth").exists()

    again = []

    def record(round_cfg):
        again.append(round_cfg.train_cls.out_subdir)
        return train_cls.train_classifier(round_cfg)

    final = run_rounds(cfg, record)
    assert again == ["train_cls/round_2"]                                         # finished rounds skipped
    assert labels_1.stat().st_mtime_ns == stamp                                   # and not clustered again
    assert final == root / "final.pth" and final.is_file()
    rounds = json.loads((root / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1, 2]
    from smaf.checkpoint import load_model
    model, spec = load_model(final)
    assert spec["args"]["subcategories"] == 2 and len(model(torch.rand(1, 3, 48, 48))) == 3
    # a third run finds everything done, through the stage entry (train_cls.method=sc_cam runs the rounds)
    assert train_cls.run(cfg) == final


def test_final_pth_is_the_last_round_of_the_rounds_setting_that_asks_for_it(tiny_voc, tmp_path):
    """A first look with rounds=1 (final.pth = round 1), then the full rounds=2: the loop goes on with round 2
    instead of returning round 1's model, and going back to rounds=1 takes round 1's model again, untrained."""
    from smaf.config import derive
    from smaf.methods.sc_cam import FINAL_OF_FILE, run_rounds
    from smaf.stages import train_cls

    cfg = _tiny_cfg(tiny_voc, tmp_path)
    trained = []

    def record(round_cfg):
        trained.append(round_cfg.train_cls.out_subdir)
        return train_cls.train_classifier(round_cfg)

    root = tmp_path / "train_cls"
    final = run_rounds(derive(cfg, train_cls__sc_cam__rounds=1), record)
    assert trained == ["train_cls/round_0", "train_cls/round_1"]
    assert final.read_bytes() == (root / "round_1" / "final.pth").read_bytes()
    assert json.loads((root / FINAL_OF_FILE).read_text())["rounds"] == 1
    run_rounds(cfg, record)                                                        # rounds=2
    assert trained[2:] == ["train_cls/round_2"]
    assert final.read_bytes() == (root / "round_2" / "final.pth").read_bytes()
    run_rounds(cfg, record)                                                        # finished: nothing trained
    run_rounds(derive(cfg, train_cls__sc_cam__rounds=1), record)
    assert trained[3:] == [] and final.read_bytes() == (root / "round_1" / "final.pth").read_bytes()
