"""The one place that names every artifact of a run: stage folders, file names, and which earlier output each
stage reads by default.

A run lives under ``work_dir``; each stage writes into ``<work_dir>/<section>.out_subdir`` (section = the
stage's config section)::

    <train_cls>/     config.yaml log.txt metrics.jsonl final.pth checkpoints/iter_*.pth
    <fusion>/        config.yaml log.txt cam_npy/ cam_png/ proto_stats/ prototypes.pt overlays/ eval/
    <train_fusion>/  config.yaml log.txt metrics.jsonl final.pth final_teacher.pth checkpoints/
    <pseudo_masks>/  config.yaml log.txt cam_npy/ cam_png/ crf_png/ overlays/ eval/
    <par>/           config.yaml log.txt cam_npy/ (refined maps) cam_png/ overlays/ eval/
    <train_aff>/     config.yaml log.txt metrics.jsonl aff_labels/ final.pth checkpoints/
    <random_walk>/   config.yaml log.txt cam_npy/ (walked maps) cam_png/ overlays/ eval/
    <a2gnn>/         config.yaml log.txt seeds/ boxes/ cam_npy/ (GNN scores) cam_png/ overlays/ eval/
    <train_seg>/     config.yaml log.txt metrics.jsonl final.pth checkpoints/
    <infer_seg>/     config.yaml log.txt seg_png/ crf_png/ overlays/ eval/ speed.json
    <train_afa>/     config.yaml log.txt metrics.jsonl final.pth checkpoints/
    <infer_afa>/     config.yaml log.txt seg_png/ crf_png/ overlays/ eval/ speed.json

A stage reads its own section plus the shared ones (``data``, ``model``, ``inference``); where it consumes
another stage's output it reads an explicit key of its own section (``fusion.checkpoint``,
``train_fusion.fusion_dir`` ...), whose empty default resolves through :data:`DEFAULT_INPUTS`.
"""
from __future__ import annotations

from pathlib import Path

# ------------------------------------------------------------------------------------- artifact names
CAM_NPY = "cam_npy"            # CAM .npy dicts {class: HxW float32} of the labelled classes (smaf.io)
CAM_PNG = "cam_png"            # label PNGs, argmax over [background score; maps], VOC numbering
CRF_PNG = "crf_png"            # label PNGs after the dense CRF
PROTO_STATS = "proto_stats"    # per image: {prototype index: mean feature} (.npy dicts)
PROTOTYPES = "prototypes.pt"   # {'prototypes': (C+1, D), 'image_counts', 'class_names', 'min_pixels'}
FINAL = "final.pth"            # the trained model (smaf.checkpoint format)
FINAL_TEACHER = "final_teacher.pth"
CHECKPOINTS = "checkpoints"    # training checkpoints iter_<n>.pth (full state, exact resume)
OVERLAYS = "overlays"
EVAL = "eval"                  # <name>.json reports of smaf.evaluate
CONFIG_FILE = "config.yaml"
LOG_FILE = "log.txt"
METRICS_FILE = "metrics.jsonl"
WARNINGS_FILE = "warnings.json"   # a training stage stopped by its guard (e.g. stage 2's collapse check) says why
AFF_LABELS = "aff_labels"      # AffinityNet labels: PNGs 0 (confident bg), c+1 (confident class c), 255 (unknown)
SEEDS = "seeds"                # A2GNN seed PNGs: 0 background, c+1 class c, 255 unlabelled
BOXES = "boxes"                # A2GNN boxes used (text box files, smaf.refine.a2gnn_boxes)
SEG_PNG = "seg_png"            # stage-4 predictions: argmax of the segmentation network's averaged probabilities

#: How a person runs each stage (for "run it first" messages), by config section.
STAGE_COMMANDS = {
    "train_cls": "stage 0 (bash script/train_cls.sh)",
    "fusion": "stage 1 (bash script/gen_fusion.sh)",
    "train_fusion": "stage 2 (bash script/train_fusion.sh)",
    "pseudo_masks": "stage 3 (bash script/gen_pm.sh)",
    "crf": "the CRF step (bash script/crf.sh)",
    "par": "the PAR step (bash script/par.sh)",
    "train_aff": "AffinityNet training (bash script/train_aff.sh)",
    "random_walk": "the random walk (bash script/random_walk.sh)",
    "a2gnn": "A2GNN (bash script/a2gnn.sh)",
    "train_seg": "stage 4 (bash script/train_seg.sh)",
    "infer_seg": "stage 4 inference (bash script/infer_seg.sh)",
    "train_afa": "AFA training (bash script/train_afa.sh)",
    "infer_afa": "AFA inference (bash script/infer_afa.sh)",
}

#: ``(section, key)`` -> ``(producing section, artifact)``: the default of each input key ('' in the config).
#: An empty artifact means the producer's folder itself.
DEFAULT_INPUTS = {
    ("fusion", "checkpoint"): ("train_cls", FINAL),
    ("train_fusion", "checkpoint"): ("train_cls", FINAL),
    ("train_fusion", "fusion_dir"): ("fusion", ""),
    ("pseudo_masks", "checkpoint"): ("train_fusion", FINAL),
    ("crf", "input_dir"): ("pseudo_masks", CAM_PNG),
    ("par", "input_dir"): ("fusion", CAM_NPY),
    ("train_aff", "cam_dir"): ("fusion", CAM_NPY),
    ("random_walk", "checkpoint"): ("train_aff", FINAL),
    ("random_walk", "cam_dir"): ("fusion", CAM_NPY),
    ("a2gnn", "checkpoint"): ("train_aff", FINAL),
    ("a2gnn", "cam_dir"): ("fusion", CAM_NPY),
    ("train_seg", "mask_dir"): ("pseudo_masks", CRF_PNG),
    ("infer_seg", "checkpoint"): ("train_seg", FINAL),
    ("infer_afa", "checkpoint"): ("train_afa", FINAL),
}


class RunLayout:
    """Paths of one run, from a resolved config (``work_dir`` and the sections' ``out_subdir``/input keys)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.work_dir = Path(cfg.work_dir)

    def stage_dir(self, section: str) -> Path:
        """``<work_dir>/<section>.out_subdir``. The CRF step's empty ``out_subdir`` means the folder that holds
        its input (stage 3's, by default), so its masks land beside the ones they refine."""
        sub = self.cfg[section].get("out_subdir", section)
        if section == "crf" and not sub:
            return self.input("crf", "input_dir").parent
        return self.work_dir / sub

    def input(self, section: str, key: str) -> Path:
        """The path ``<section>.<key>`` names, or its default from :data:`DEFAULT_INPUTS`."""
        value = self.cfg[section].get(key, "")
        if value not in ("", None):
            return Path(value)
        producer, artifact = DEFAULT_INPUTS[(section, key)]
        folder = self.stage_dir(producer)
        return folder / artifact if artifact else folder

    @staticmethod
    def producer(section: str, key: str) -> str:
        """How to make the default input ``<section>.<key>`` ("stage 1 (bash script/gen_fusion.sh)")."""
        return STAGE_COMMANDS[DEFAULT_INPUTS[(section, key)][0]]
