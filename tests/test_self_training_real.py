"""Stage 2 on a small real subset (three MSRC classes) with the real-set settings of smaf/configs/msrc.yaml
(per-image target background, padding out of the loss, one logit temperature): no collapse (the old settings fell
from 49.1 to 27.5 validation mIoU on this subset, and on the whole set from fused 48.6 to self-trained 5.8), and
the self-trained pseudo masks of the training images are not below the fused maps they learn from. About 70 s
on one core (a short schedule at crop 128: 40 + 30 iterations); skips without ../shared."""
import numpy as np
import pytest

from smaf.config import load_config
from smaf.data.voc import VOCLayout
from smaf.engine import read_metrics
from smaf.stages import gen_fusion, gen_pm, train_cls, train_fusion

CLASSES = (0, 6, 9)          # aeroplane, car, cow (VOC index - 1): frequent single-class MSRC photos
TRAIN_PER_CLASS, VAL_PER_CLASS = 10, 4


def _subset(layout, list_path, per_class):
    ids = []
    for c in CLASSES:
        ids += [i for i in layout.read_list(list_path)
                if layout.labels[i][c] > 0.5 and layout.labels[i].sum() == 1][:per_class]
    return ids


@pytest.mark.cost(75)
def test_stage2_on_real_msrc_neither_collapses_nor_falls_below_its_fused_maps(msrc_root, tmp_path):
    layout = VOCLayout(msrc_root)
    lists = msrc_root / "ImageSets/Segmentation"
    for name, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        ids = _subset(layout, lists / f"{name}.txt", per_class)
        assert len(ids) == per_class * len(CLASSES)
        (tmp_path / f"{name}.txt").write_text("\n".join(ids) + "\n")
    cfg = load_config("msrc", [
        f"work_dir={tmp_path / 'run'}", f"data.root={msrc_root}", f"data.train_list={tmp_path / 'train.txt'}",
        f"data.infer_list={tmp_path / 'train.txt'}", f"data.val_list={tmp_path / 'val.txt'}", "num_workers=0",
        "inference.base_long=160", "inference.scales=[0.5,1.0,1.5]",
        "train_cls.iterations=40", "train_cls.crop=128", "train_cls.resize_long=[112,160]", "train_cls.val_every=0",
        "train_cls.ckpt_every=0", "fusion.overlays=0", "pseudo_masks.overlays=0", "pseudo_masks.crf=false",
        "train_fusion.iterations=30", "train_fusion.crop=128", "train_fusion.resize_long=[112,160]",
        "train_fusion.val_every=10", "train_fusion.ckpt_every=0", "train_fusion.log_every=10"])
    assert cfg.train_fusion.target_bg == "rule" and cfg.train_fusion.calibration == "scale"
    train_cls.run(cfg)
    fused = gen_fusion.run(cfg)
    final = train_fusion.run(cfg)
    vals = [row["val_miou"] for row in read_metrics(final.parent / "metrics.jsonl") if "val_miou" in row]
    assert len(vals) == 1 + 30 // 10                           # before training, then every 10 iterations
    assert vals[0] > 20.0                                      # a real starting point, not a broken stage 0
    # no collapse: within the guard's bound (collapse_drop 10) all along, and the guard did not fire. On this
    # tiny subset the single-scale validation track still dips (measured 47.0 -> 42.9 here; 49.1 -> 44.3 with a
    # longer schedule: README, Self-training); on the whole MSRC set it rises (42.6 -> 49.7)
    assert min(vals) > vals[0] - cfg.train_fusion.collapse_drop, np.round(vals, 2)
    assert not (final.parent / "warnings.json").exists()
    masks = gen_pm.run(cfg)
    # measured: fused 41.62, self-trained 45.68 (Intel Xeon VM, one thread); half a point of slack for other CPUs
    assert masks["miou"] >= fused["miou"] - 0.5, (masks["miou"], fused["miou"])
