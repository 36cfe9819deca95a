"""The whole pipeline in one command, with every stage measured (``bash script/demo.sh``,
``bash script/bench_real.sh pets|msrc``).

For each stage-0 path (``--methods``, default the config's ``train_cls.method``; e.g. ``cam,eps``): stage 0 on
the training list (no periodic validation: stage 1 scores its final model); stage 1 single-scale (the baseline:
the scale-1.0 pass of the multi-scale run, no flip) and multi-scale on the training and validation lists;
stage 2 once per denoising setting; stage 3 on both lists for each setting, with the CRF for the config's
default setting. With a saliency path or ``--baselines``, the saliency step runs first (its maps feed the EPS
loss) and the "saliency x image label" baseline is scored on both lists. Prints one table of mIoU (train =
pseudo-mask quality, val) with the config's background rule (a fixed score, or per-image Otsu: never tuned on
ground truth; with Otsu the same maps are also scored at the fixed ``inference.bg_threshold`` for comparison),
the baselines, the wall time of each stage, and writes ``summary.json``, ``summary.md`` and ``figure.jpg``
(image | GT | [saliency x label] | per path: fused CAM, final mask, for a few validation images) into
``work_dir``. With several paths each runs in ``<work_dir>/<method>/``.

With ``--cams-only`` each path stops after stage 1 (single-scale and fused CAM: the method axis), and the
summary gives each path's wall time.

With ``--segmentation`` (stage 4, opt-in): after each path's stages 0-3 the segmentation network
(``train_seg``) is trained on that path's final pseudo masks (:func:`stage4_masks`: the default self-trained
setting's CRF PNGs of the training list, or with ``--refiners rw`` its ``+ RW + CRF`` masks) in
``<path work_dir>/train_seg/`` (``train_seg_rw/``) and run over the validation list (``infer_seg``, mIoU with
and without the CRF) in ``<path work_dir>/infer_seg/`` (``infer_seg_rw/``); once per run, its fully supervised twin (the same
network, schedule and inference on the ground-truth masks, ``train_seg.masks=gt``) in
``<work_dir>/train_seg_gt/`` and ``<work_dir>/infer_seg_gt/``. A second table gives both val mIoUs and their
ratio (docs/segmentation.md).

Every stage skips finished outputs, so re-running after an interruption continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from .config import apply_overrides, config_changes, derive, load_config
from .run_layout import CAM_NPY, CAM_PNG, CRF_PNG, FINAL, WARNINGS_FILE

SPLITS = ("train", "val")
SINGLE, FUSED = "single-scale CAM", "fused multi-scale CAM"
SALIENCY_BASELINE = "saliency x image label"
#: Refiners the runner can chain after stage 1 (fused maps) and stage 3 (self-trained maps of the default
#: setting): ``par`` (AFA's PAR, training-free), ``rw`` (AffinityNet trained on the path's fused train maps,
#: then the random walk, and the CRF after it), ``a2gnn`` (an AffinityNet trained with A2GNN's gated-CRF
#: objective on the same maps, then A2GNN from each source's seeds: its graph, walk and CRF; and once per path
#: from the tight boxes of the ground-truth masks, a stronger supervision shown for reference).
REFINERS = ("par", "rw", "a2gnn")
#: Stage 4 (``--segmentation``): the row names of its table and the (train_seg, infer_seg) folders of each
#: mask source, under the path's work_dir (pseudo) or the top work_dir (gt, once per run).
SEG_ROWS = {"pseudo": "trained on our pseudo masks", "gt": "trained on ground truth (fully supervised)"}
SEG_DIRS = {"pseudo": ("train_seg", "infer_seg"), "gt": ("train_seg_gt", "infer_seg_gt")}
#: Stage 4 on the random-walk masks (``--refiners rw``) gets folders of its own: a finished network trained on
#: other masks is never taken for it.
SEG_DIRS_RW = ("train_seg_rw", "infer_seg_rw")
#: The suffixes :func:`refine_rows` appends to a source column's name (one place, shared with the stage-4 mask
#: choice and the summary's split of stage columns from refiner columns).
PAR_SUFFIX, RW_SUFFIX, RW_CRF_SUFFIX, A2GNN_SUFFIX = " + PAR", " + RW", " + RW + CRF", " + A2GNN"
#: The column of A2GNN from box seeds (``--refiners a2gnn``): not image-level supervision.
BOX_A2GNN = "A2GNN from boxes (tight boxes of the GT masks)"
#: The sections that must agree between a path's stage 4 and the twin for the ratio to compare like with like.
SEG_SECTIONS = ("model", "train_seg", "infer_seg")


def _variant_name(denoise: bool) -> str:
    return "denoise_on" if denoise else "denoise_off"


def _column(denoise: bool) -> str:
    return f"self-trained ({_variant_name(denoise).replace('_', ' ')})"


class _Clock:
    """Times named steps; a step whose outputs already existed (it returns in a fraction of the recorded time)
    keeps the wall time measured when it ran (``<work_dir>/timings.json``)."""

    def __init__(self, path: Path, log):
        self.path, self.log = path, log
        self.measured = json.loads(path.read_text()) if path.is_file() else {}
        self.timings = {}

    def __call__(self, name: str, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        elapsed = round(time.perf_counter() - start, 1)
        resumed = name in self.measured and elapsed < 0.2 * self.measured[name]
        self.timings[name] = self.measured[name] if resumed else elapsed
        self.measured[name] = self.timings[name]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.measured, indent=2))
        self.log(f"== {name}: {self.timings[name]:.1f} s" + (" (measured when it ran; outputs reused now)"
                                                             if resumed else ""))
        return out


def run_path(cfg, clock: _Clock, denoise_variants=None, prefix: str = "", refiners=(), cams_only: bool = False) -> dict:
    """Stages 0-3 of one stage-0 path (``cfg.train_cls.method``) in ``cfg.work_dir``, then the ``refiners``
    (:data:`REFINERS`) on its fused and self-trained maps; with ``cams_only`` stages 0 and 1 only (the method
    axis: single-scale and fused CAM). Returns ``{'miou': {split: {column: value}}, 'folders': {split: {column:
    stage folder}}, 'bg_scores', 'warnings', 'default_column'}`` (the column of the final masks: the fused CAM
    with ``cams_only``)."""
    from .stages import gen_fusion, gen_pm, train_cls, train_fusion

    default_denoise = bool(cfg.train_fusion.denoise)
    variants = list(dict.fromkeys(denoise_variants if denoise_variants is not None else [default_denoise]))
    # (generation list, evaluation list); stage 2 needs the fused maps of every training image
    lists = {"train": (cfg.data.train_list, cfg.data.infer_list), "val": (cfg.data.val_list, cfg.data.val_list)}
    out = {"miou": {s: {} for s in SPLITS}, "folders": {s: {} for s in SPLITS}, "bg_scores": {s: {} for s in SPLITS},
           "warnings": [], "default_column": _column(default_denoise)}

    def record(split, column, result):
        out["miou"][split][column] = result["miou"]
        out["folders"][split][column] = Path(result["out_dir"])
        if result.get("bg_scores"):
            out["bg_scores"][split][column] = result["bg_scores"]

    # No periodic stage-0 validation: stage 1's single-scale pass scores the final model on the validation list
    # with the same metric (single-scale CAM mIoU, the inference settings and background rule), and a mid-run
    # value changes nothing here (about 4 % of a real benchmark's time on a 2-core CPU).
    clock(f"{prefix}stage 0: train classifier", train_cls.run, derive(cfg, train_cls__val_every=0))
    with_one = 1.0 in [float(v) for v in cfg.inference.scales]
    for split in SPLITS:
        gen_list, eval_list = lists[split]
        single_subdir = f"fusion_single_{split}"
        if not with_one:   # the single-scale CAM is a separate run only when the scales lack 1.0
            single = derive(cfg, inference__scales=[1.0], inference__flip=False, fusion__out_subdir=single_subdir,
                            fusion__list=gen_list, fusion__eval_list=eval_list)
            record(split, SINGLE, clock(f"{prefix}stage 1 single-scale ({split})", gen_fusion.run, single))
        multi = derive(cfg, fusion__out_subdir=cfg.fusion.out_subdir if split == "train" else f"fusion_{split}",
                       fusion__list=gen_list, fusion__eval_list=eval_list,
                       fusion__single_subdir=single_subdir if with_one else "")
        # with 1.0 among the scales its unflipped pass IS the single-scale CAM: both from one run
        result = clock(f"{prefix}stage 1 {'single + ' if with_one else ''}multi-scale ({split})", gen_fusion.run,
                       multi)
        if with_one:
            record(split, SINGLE, result["single"])
        record(split, FUSED, result)
    if cams_only:
        out["default_column"] = FUSED
        variants = []
    for denoise in variants:
        name = _variant_name(denoise)
        stage2 = derive(cfg, train_fusion__denoise=denoise, train_fusion__out_subdir=f"train_fusion_{name}")
        final = clock(f"{prefix}stage 2: self-training ({name})", train_fusion.run, stage2)
        warning = Path(final).parent / WARNINGS_FILE
        if warning.is_file():
            out["warnings"].append(f"{prefix}stage 2 ({name}): {json.loads(warning.read_text())['warning']}")
        for split in SPLITS:
            gen_list, eval_list = lists[split]
            if int(cfg.pipeline.subset) > 0:   # no stage 4 to feed: the scored ids only
                gen_list = eval_list
            with_crf = denoise == default_denoise
            stage3 = derive(stage2, pseudo_masks__out_subdir=f"pseudo_masks_{name}_{split}",
                            pseudo_masks__list=gen_list, pseudo_masks__eval_list=eval_list,
                            pseudo_masks__crf=with_crf)
            result = clock(f"{prefix}stage 3: pseudo masks{' + CRF' if with_crf else ''} ({name}, {split})",
                           gen_pm.run, stage3)
            record(split, _column(denoise), result)
            if with_crf:
                out["miou"][split][_column(denoise) + " + CRF"] = result["miou_crf"]
                out["folders"][split][_column(denoise) + " + CRF"] = Path(result["out_dir"])
    if refiners:
        refine_rows(cfg, clock, out, lists, refiners, prefix)
    if cfg.inference.bg_method != "fixed":
        npy_dirs = {s: {c: d / CAM_NPY for c, d in cols.items() if c in (SINGLE, FUSED) or
                        c.startswith("self-trained") and c.endswith(")")} for s, cols in out["folders"].items()}
        out["miou_fixed"] = clock(f"{prefix}fixed-score comparison", fixed_score_comparison, cfg, npy_dirs,
                                  float(cfg.inference.bg_threshold), clock.log)
    return out


def refine_rows(cfg, clock: _Clock, out: dict, lists: dict, refiners, prefix: str = "") -> None:
    """Add ``<source> + PAR``, ``<source> + RW``, ``<source> + RW + CRF`` and ``<source> + A2GNN`` columns to a
    path's result ``out`` (in place) for the sources fused multi-scale CAM and the default self-trained setting, on
    both lists, as ``refiners`` asks; with ``a2gnn`` also the :data:`BOX_A2GNN` column."""
    from .stages import a2gnn, crf, par, random_walk, train_aff

    bad = [r for r in refiners if r not in REFINERS]
    if bad:
        raise ValueError(f"unknown refiner(s) {bad}: expected some of {', '.join(REFINERS)}")
    sources = {FUSED: "fused", out["default_column"]: "self_trained"}
    # with pipeline.subset the refiners make only the scored ids (A2GNN trains a network per image); otherwise
    # every map of the source folder, which stage 4 trains on when data.train_list is longer than infer_list
    subset = int(cfg.pipeline.subset) > 0
    if "rw" in refiners:
        aff = derive(cfg, train_aff__cam_dir=str(out["folders"]["train"][FUSED] / CAM_NPY),
                     train_aff__train_list=lists["train"][0])
        rw_checkpoint = clock(f"{prefix}AffinityNet (on the fused train maps)", train_aff.run, aff)
    if "a2gnn" in refiners:   # A2GNN's own affinity CNN: the PSA terms over its window + the gated-CRF term
        gated = derive(cfg, train_aff__cam_dir=str(out["folders"]["train"][FUSED] / CAM_NPY),
                       train_aff__train_list=lists["train"][0], train_aff__objective="a2gnn",
                       train_aff__out_subdir="train_aff_a2gnn")
        a2gnn_checkpoint = clock(f"{prefix}AffinityNet, A2GNN objective (on the fused train maps)", train_aff.run,
                                 gated)
    for split in SPLITS:
        eval_list = lists[split][1]
        for column, tag in sources.items():
            source = out["folders"][split][column] / CAM_NPY
            if "par" in refiners:
                step = derive(cfg, par__input_dir=str(source), par__out_subdir=f"par_{tag}_{split}",
                              par__eval_list=eval_list, par__list=eval_list if subset else "")
                result = clock(f"{prefix}PAR ({tag}, {split})", par.run, step)
                out["miou"][split][column + PAR_SUFFIX] = result["miou"]
                out["folders"][split][column + PAR_SUFFIX] = Path(result["out_dir"])
            if "rw" in refiners:
                step = derive(cfg, random_walk__cam_dir=str(source), random_walk__checkpoint=str(rw_checkpoint),
                              random_walk__out_subdir=f"rw_{tag}_{split}", random_walk__eval_list=eval_list,
                              random_walk__list=eval_list if subset else "")
                result = clock(f"{prefix}random walk ({tag}, {split})", random_walk.run, step)
                out["miou"][split][column + RW_SUFFIX] = result["miou"]
                out["folders"][split][column + RW_SUFFIX] = Path(result["out_dir"])
                refine = derive(cfg, crf__input_dir=str(Path(result["out_dir"]) / CAM_PNG), crf__out_subdir="",
                                crf__output_dir="", crf__eval_list=eval_list)
                out["miou"][split][column + RW_CRF_SUFFIX] = clock(f"{prefix}CRF after RW ({tag}, {split})",
                                                                  crf.run, refine)["miou"]
                # the CRF writes <rw folder>/crf_png: the same layout as the " + CRF" columns' folders
                out["folders"][split][column + RW_CRF_SUFFIX] = Path(result["out_dir"])
            if "a2gnn" in refiners:
                step = derive(cfg, a2gnn__cam_dir=str(source), a2gnn__checkpoint=str(a2gnn_checkpoint),
                              a2gnn__out_subdir=f"a2gnn_{tag}_{split}", a2gnn__eval_list=eval_list,
                              a2gnn__list=eval_list if subset else "",
                              a2gnn__preset="image")
                result = clock(f"{prefix}A2GNN ({tag}, {split})", a2gnn.run, step)
                out["miou"][split][column + A2GNN_SUFFIX] = result["miou"]
                out["folders"][split][column + A2GNN_SUFFIX] = Path(result["out_dir"])
        if "a2gnn" in refiners:
            step = derive(cfg, a2gnn__preset="box", a2gnn__box_dir="masks", a2gnn__checkpoint=str(a2gnn_checkpoint),
                          a2gnn__out_subdir=f"a2gnn_box_{split}", a2gnn__list=eval_list, a2gnn__eval_list=eval_list,
                          a2gnn__cam_dir=str(out["folders"][split][FUSED] / CAM_NPY))
            result = clock(f"{prefix}A2GNN from boxes ({split})", a2gnn.run, step)
            out["miou"][split][BOX_A2GNN] = result["miou"]
            out["folders"][split][BOX_A2GNN] = Path(result["out_dir"])


def stage4_masks(path: dict) -> tuple:
    """What stage 4 of a :func:`run_path` result trains on, decided once: the end of the longest chain that ran,
    i.e. the default self-trained setting ``+ RW + CRF`` when the random walk ran (``--refiners rw``), else its
    ``+ CRF`` masks. Returns ``(column, mask_dir, subdirs)``: the column's name, its training-list label PNGs
    (``<folder>/crf_png``) and the (train_seg, infer_seg) folders of that source (:data:`SEG_DIRS_RW` for the
    random-walk masks, so that a network trained on other masks is never taken for it)."""
    refined = path["default_column"] + RW_CRF_SUFFIX
    if refined in path["folders"]["train"]:
        column, subdirs = refined, SEG_DIRS_RW
    else:
        column, subdirs = path["default_column"] + " + CRF", SEG_DIRS["pseudo"]
    return column, Path(path["folders"]["train"][column]) / CRF_PNG, subdirs


def segmentation_step(cfg, clock: _Clock, masks: str, mask_dir="", prefix: str = "", subdirs=None) -> dict:
    """Stage 4 in ``cfg.work_dir``: ``train_seg`` on ``data.train_list`` with ``masks`` ('pseudo': the label PNGs
    of ``mask_dir``; 'gt': the ground truth, the fully supervised twin), then ``infer_seg`` of ``data.val_list``,
    in the folders ``subdirs`` (train, infer; default: what :data:`SEG_DIRS` names for ``masks``). Both skip
    finished work (``final.pth``; images whose PNGs exist). Returns ``{'miou', 'miou_crf' (None without
    infer_seg.crf or val masks), 'train_dir', 'infer_dir'}``."""
    from .stages import infer_seg, train_seg

    train_sub, infer_sub = subdirs or SEG_DIRS[masks]
    step = derive(cfg, train_seg__masks=masks, train_seg__mask_dir=str(mask_dir) if masks == "pseudo" else "",
                  train_seg__train_list=cfg.data.train_list, train_seg__out_subdir=train_sub,
                  infer_seg__checkpoint=str(Path(cfg.work_dir) / train_sub / FINAL), infer_seg__out_subdir=infer_sub,
                  infer_seg__list=cfg.data.val_list, infer_seg__eval_list=cfg.data.val_list)
    what, tag = (("our pseudo masks", "pseudo masks") if masks == "pseudo" else
                 ("the ground truth (fully supervised twin)", "fully supervised twin"))
    final = clock(f"{prefix}stage 4: segmentation network on {what}", train_seg.run, step)
    result = clock(f"{prefix}stage 4 inference ({tag}, val)", infer_seg.run, step)
    return {"miou": result["miou"], "miou_crf": result["miou_crf"], "train_dir": str(Path(final).parent),
            "infer_dir": str(result["out_dir"])}


def _ratio(a, b):
    return None if a is None or not b else round(a / b, 4)


def run_pipeline(cfg, denoise_variants=None, figure_rows: int = 4, log=print, methods=None,
                 baselines: bool = False, refiners=(), segmentation: bool = False, cams_only: bool = False) -> dict:
    """Run and measure every stage of every path. Returns the summary dict (also written to
    ``<work_dir>/summary.json``): ``{'paths': {method: run_path(...) result}, 'baselines': {split: {name: mIoU}},
    'timings_s', 'total_s' (their sum), 'wall_s' (this call, start to end), 'warnings', ...}``; with
    ``segmentation`` (stage 4, :func:`segmentation_step`) also ``'segmentation': {'network', 'pseudo': {method:
    result + {'masks': column it trained on}}, 'gt': result, 'ratio': {method: {'miou', 'miou_crf'}}}`` (ratio =
    pseudo / gt val mIoU). ``'path_s'``: {method: wall time
    of its steps}. ``cams_only``: stages 0 and 1 of each path only (no refiners, no stage 4)."""
    from . import saliency
    from .methods import get_method

    started = time.perf_counter()
    work = Path(cfg.work_dir)
    if cams_only and (refiners or segmentation):
        raise ValueError("--cams-only stops after stage 1: drop --refiners / --segmentation (they need stage 3's "
                         "masks), or drop --cams-only")
    subset = int(cfg.pipeline.subset)
    if subset < 0 or subset and segmentation:
        raise ValueError(f"pipeline.subset={subset}: a number of ids > 0 (0 = the whole lists), and not with "
                         "--segmentation (stage 4 trains on the masks of the whole training list)")
    subset_info = None
    if subset:   # score every column on the same few ids; stages 0 and 2 still train on data.train_list
        subset_info = write_subset_lists(cfg, subset, work / f"subset_{subset}")
        cfg = derive(cfg, data__infer_list=subset_info["train"], data__val_list=subset_info["val"])
        log(f"== scored on a subset: {subset} ids of each list ({subset_info['train']}, {subset_info['val']})")
    methods = list(dict.fromkeys(methods or [cfg.train_cls.method]))
    for m in methods:
        get_method(m)   # an unknown method, or a bad key of its path overrides, fails before any work
        apply_overrides(derive(cfg), cfg.pipeline.path_overrides.get(m, []))
    clock = _Clock(work / "timings.json", log)

    def needs_saliency(m: str) -> bool:   # ppc needs it on base eps only: ask with the path's own options
        path_cfg = apply_overrides(derive(cfg, train_cls__method=m), cfg.pipeline.path_overrides.get(m, []))
        return get_method(m).needs_saliency_for(path_cfg.train_cls.get(m))

    if baselines or any(needs_saliency(m) for m in methods):
        clock("saliency maps (train + val)", saliency.run, derive(cfg, saliency__lists=[]))
    paths, seg_pseudo, seg_warnings, path_s, path_cfgs = {}, {}, [], {}, {}
    for m in methods:
        path_cfg = derive(cfg, train_cls__method=m)
        # a path's own settings (pipeline.path_overrides.<method>: key=value strings), e.g. its stage-2 lr
        path_cfg = apply_overrides(path_cfg, cfg.pipeline.path_overrides.get(m, []))
        if len(methods) > 1:
            path_cfg = derive(path_cfg, work_dir=str(work / m))
        prefix = f"{m}: " if len(methods) > 1 else ""
        if m == "sc_cam" and "cam" in path_cfgs:
            path_cfg = share_sc_cam_round0(path_cfg, path_cfgs["cam"], log)
        path_cfgs[m] = path_cfg
        spent = sum(clock.timings.values())
        paths[m] = run_path(path_cfg, clock, denoise_variants, prefix=prefix, refiners=refiners, cams_only=cams_only)
        if segmentation:
            column, mask_dir, subdirs = stage4_masks(paths[m])
            seg_pseudo[m] = dict(segmentation_step(path_cfg, clock, "pseudo", mask_dir, prefix, subdirs),
                                 masks=column)
            changed = config_changes({k: cfg[k] for k in SEG_SECTIONS}, {k: path_cfg[k] for k in SEG_SECTIONS})
            if changed:
                seg_warnings.append(f"stage 4 of the {m} path ran with other settings than its fully supervised "
                                    f"twin ({'; '.join(changed)}): the ratio compares unlike networks")
        path_s[m] = round(sum(clock.timings.values()) - spent, 1)   # its stages (and its stage 4), not the twin
    summary = {"config": cfg.get("config_name", ""), "work_dir": str(cfg.work_dir), "backbone": cfg.model.backbone,
               "bg_method": cfg.inference.bg_method, "bg_threshold": cfg.inference.bg_threshold,
               "methods": methods, "paths": paths, "subset": subset_info,
               "warnings": [w for p in paths.values() for w in p["warnings"]] + seg_warnings}
    if segmentation:   # the twin does not depend on the path: once per run, in the top work_dir
        gt = segmentation_step(cfg, clock, "gt")
        sect = cfg.train_seg
        summary["segmentation"] = {
            "network": f"{sect.arch} on {cfg.model.backbone} at output stride {cfg.model.output_stride}, "
                       f"{sect.iterations} iterations of batch {sect.batch_size} at crop {sect.crop}; inference at "
                       f"scales {list(cfg.infer_seg.scales)}{' x flip' if cfg.infer_seg.flip else ''}",
            "pseudo": seg_pseudo, "gt": gt,
            "ratio": {m: {k: _ratio(r[k], gt[k]) for k in ("miou", "miou_crf")} for m, r in seg_pseudo.items()}}
    if baselines:
        summary["baselines"] = clock("baselines (saliency x image label)", saliency_baselines, cfg,
                                     work, paths[methods[0]]["folders"])
    summary["timings_s"] = clock.timings
    summary["path_s"] = path_s
    summary["total_s"] = round(sum(clock.timings.values()), 1)
    summary["figure"] = str(make_figure(cfg, work, paths, figure_rows, with_saliency=baselines))
    # this call's own wall time: the steps as they ran now (reused outputs cost seconds) and what lies between them
    summary["wall_s"] = round(time.perf_counter() - started, 1)
    for p in paths.values():   # Paths -> str for JSON
        p["folders"] = {s: {c: str(d) for c, d in cols.items()} for s, cols in p["folders"].items()}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    (work / "summary.md").write_text(format_summary(summary))
    return summary


def write_subset_lists(cfg, n: int, folder: Path) -> dict:
    """``n`` ids of ``data.infer_list`` and of ``data.val_list``, spread evenly over each list's order (indices
    ``round(linspace(0, len - 1, n))``: no label or mask is looked at), written as ``<folder>/{train,val}.txt``.
    Returns ``{'train': path, 'val': path, 'kept': {split: ids written}, 'of': {split: length of the full list}}``;
    a list of ``n`` ids or fewer is kept whole."""
    from .data.voc import VOCLayout
    from .io import atomic_save

    layout = VOCLayout.from_config(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    out = {"kept": {}, "of": {}}
    for split, lst in (("train", cfg.data.infer_list), ("val", cfg.data.val_list)):
        ids = layout.read_list(lst)
        keep = ids if len(ids) <= n else [ids[i] for i in np.unique(np.round(np.linspace(0, len(ids) - 1, n))
                                                                      .astype(int))]
        path = folder / f"{split}.txt"
        text = "".join(f"{i}\n" for i in keep)
        atomic_save(path, lambda tmp: Path(tmp).write_text(text))
        out[split], out["kept"][split], out["of"][split] = str(path), len(keep), len(ids)
    return out


def share_sc_cam_round0(sc_cam_cfg, cam_cfg, log=print):
    """SC-CAM's round 0 trains a plain ``cam`` classifier with its path's settings. When the run's ``cam`` path
    (config ``cam_cfg``, already run) trained exactly that (the whole config equal apart from ``work_dir`` once the
    method is set to ``cam``), its ``final.pth`` is round 0: returns ``sc_cam_cfg`` with
    ``train_cls.sc_cam.initial_checkpoint`` set to it (unchanged when set already or when the settings differ)."""
    from .run_layout import RunLayout

    if str(sc_cam_cfg.train_cls.sc_cam.initial_checkpoint or ""):
        return sc_cam_cfg
    round0 = derive(sc_cam_cfg, train_cls__method="cam", work_dir=cam_cfg.work_dir)
    if config_changes(round0.to_dict(), cam_cfg.to_dict()):
        return sc_cam_cfg
    final = RunLayout(cam_cfg).stage_dir("train_cls") / FINAL
    log(f"== sc_cam: round 0 is the cam path's classifier ({final}): the same settings, not trained twice")
    return derive(sc_cam_cfg, train_cls__sc_cam__initial_checkpoint=str(final))


def saliency_baselines(cfg, work: Path, folders: dict) -> dict:
    """mIoU of the "saliency x image label" masks (:func:`smaf.saliency.saliency_label_mask`; images with
    several classes split by the fused CAM of ``folders``) on the train and val lists; the masks are written
    to ``<work>/baseline_saliency_<split>/`` with the per-class report in its ``eval/``."""
    from .data.voc import VOCLayout
    from .evaluate import evaluate_folder, write_report
    from .saliency import write_saliency_baseline

    layout = VOCLayout.from_config(cfg)
    names = ["background"] + layout.class_names
    out = {}
    for split, lst in (("train", cfg.data.infer_list), ("val", cfg.data.val_list)):
        ids = layout.read_list(lst)
        if not layout.has_masks(ids):
            continue
        folder = work / f"baseline_saliency_{split}"
        write_saliency_baseline(layout, ids, folder / CAM_PNG, folders[split][FUSED] / CAM_NPY)
        result = evaluate_folder(folder / CAM_PNG, layout.mask_dir, ids, names, desc=f"baseline ({split})")
        write_report(result, folder / "eval", CAM_PNG)
        out[split] = {SALIENCY_BASELINE: result["miou"]}
    return out


def fixed_score_comparison(cfg, npy_dirs: dict, threshold: float, log=print) -> dict:
    """mIoU of every column's CAM dicts at the fixed background score ``threshold`` (no CRF), to set the
    per-image rule of the config beside the constant. Returns {split: {column: mIoU or None}}."""
    from .data.voc import VOCLayout
    from .evaluate import evaluate_folder

    layout = VOCLayout.from_config(cfg)
    names = ["background"] + layout.class_names
    lists = {"train": cfg.data.infer_list, "val": cfg.data.val_list}
    out = {}
    for split, columns in npy_dirs.items():
        ids = layout.read_list(lists[split])
        if not layout.has_masks(ids):
            continue
        out[split] = {c: evaluate_folder(d, layout.mask_dir, ids, names, bg_threshold=threshold,
                                         desc=f"fixed {threshold:.2f}: {c} ({split})")["miou"]
                      for c, d in columns.items()}
        log(f"== at the fixed background score {threshold:.2f} ({split}): "
            + ", ".join(f"{c} {v:.2f}" for c, v in out[split].items()))
    return out


def _bg_rule_line(summary: dict) -> str:
    if summary.get("bg_method", "fixed") == "fixed":
        return (f"background threshold {summary['bg_threshold']:.2f} (fixed by the config, not tuned on ground "
                f"truth)")
    spread = []
    several = len(summary["paths"]) > 1
    for method, path in summary["paths"].items():
        for split, columns in path.get("bg_scores", {}).items():
            for column, s in columns.items():
                spread.append(f"{method + ' ' if several else ''}{column} ({split}) {s['median']:.2f} "
                              f"[{s['p10']:.2f}-{s['p90']:.2f}]")
    return ("background threshold: per-image Otsu threshold of each image's own fused map (config "
            "`inference.bg_method: otsu`; no ground truth involved). Median [10th-90th percentile] of the "
            "thresholds used: " + "; ".join(spread))


def format_summary(summary: dict) -> str:
    """Markdown: one column per stage, one row per path and split (and per split at the fixed score when the
    config's rule is per-image); the baselines; warnings; the background rule and the stage timings."""
    paths = summary["paths"]
    several = len(paths) > 1
    every = list(dict.fromkeys(c for p in paths.values() for s in p["miou"] for c in p["miou"][s]))
    refined = [c for c in every if c.endswith((PAR_SUFFIX, RW_SUFFIX, RW_CRF_SUFFIX, A2GNN_SUFFIX)) or c == BOX_A2GNN]
    columns = [c for c in every if c not in refined]
    columns.sort(key=lambda c: c.endswith("+ CRF"))   # stable: the CRF column last, as the final masks

    def table(cols, with_fixed):
        out = [f"| mIoU (%) | {' | '.join(cols)} |", "|---" * (len(cols) + 1) + "|"]

        def row(label, values):
            cells = [values.get(c) for c in cols]
            return f"| {label} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in cells) + " |"

        for method, path in paths.items():
            name = f"{method} path, " if several else ""
            for split in path["miou"]:
                out.append(row(f"{name}{split}", path["miou"][split]))
            for split, values in (path.get("miou_fixed") or {}).items() if with_fixed else ():
                out.append(row(f"{name}{split}, fixed {summary['bg_threshold']:.2f} (comparison)", values))
        return out

    lines = table(columns, True)
    sub = summary.get("subset")
    if sub:   # every number of the run is of these ids, not of the whole lists
        lines = [f"**On a subset**: every mIoU below is of {sub['kept']['train']} of the "
                 f"{sub['of']['train']} train ids and {sub['kept']['val']} of the "
                 f"{sub['of']['val']} val ids (spread evenly over each list; `{sub['train']}`, `{sub['val']}`); "
                 "stages 0 and 2 trained on the whole training list.", ""] + lines
    if refined:
        crf_cols = [c for c in columns if c.endswith("+ CRF")]
        lines += ["", "Refiners (same maps; no threshold tuned on ground truth):", ""] + table(crf_cols + refined, False)
    baselines = summary.get("baselines") or {}
    if baselines:
        names = list(dict.fromkeys(n for v in baselines.values() for n in v))
        lines += ["", "| baseline (no training) | " + " | ".join(baselines) + " |", "|---" * (len(baselines) + 1) + "|"]
        for n in names:
            lines.append(f"| {n} | " + " | ".join(f"{baselines[s][n]:.2f}" for s in baselines) + " |")
    if summary.get("segmentation"):
        lines += [""] + segmentation_table(summary)
    for warning in summary.get("warnings") or []:
        lines += ["", f"**warning**: {warning}"]
    lines += ["", _bg_rule_line(summary) + f"; backbone {summary['backbone']}", "", "| stage | wall time (s) |",
              "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in summary["timings_s"].items()]
    lines.append(f"| total | {summary['total_s']:.1f} |")
    if summary.get("wall_s") is not None:
        lines.append(f"| this call, start to end (reused steps cost ~0 here) | {summary['wall_s']:.1f} |")
    if len(summary.get("path_s") or {}) > 1:
        lines += ["", "| path | wall time (s) |", "|---|---|"] + [f"| {m} | {v:.1f} |"
                                                               for m, v in summary["path_s"].items()]
    return "\n".join(lines) + "\n"


def segmentation_table(summary: dict) -> list[str]:
    """Markdown lines of the stage-4 table: val mIoU (and after the CRF) of the network trained on each path's
    pseudo masks and on the ground truth, their ratio, and a sentence on what it means."""
    seg = summary["segmentation"]
    several = len(seg["pseudo"]) > 1

    def cells(values, ratio=False):
        return " | ".join("-" if values.get(k) is None else f"{100 * values[k]:.1f}%" if ratio else
                          f"{values[k]:.2f}" for k in ("miou", "miou_crf"))

    lines = [f"Stage 4, the segmentation network ({seg['network']}):", "",
             "| stage 4: val mIoU (%) | network | + CRF |", "|---|---|---|"]
    for m, result in seg["pseudo"].items():
        lines.append(f"| {SEG_ROWS['pseudo']}{f' ({m} path)' if several else ''} | {cells(result)} |")
    lines.append(f"| {SEG_ROWS['gt']} | {cells(seg['gt'])} |")
    for m, ratio in seg["ratio"].items():
        lines.append(f"| ratio pseudo / ground truth{f' ({m} path)' if several else ''} | {cells(ratio, True)} |")
    own, trained_on = [], []
    for m, path in summary["paths"].items():
        # older summaries (before the RW masks could feed stage 4) name no column: it was the CRF masks
        column = seg["pseudo"].get(m, {}).get("masks", path["default_column"] + " + CRF")
        trained_on.append(f"'{column}'{f' ({m})' if several else ''}")
        value = path["miou"].get("val", {}).get(column)
        if value is not None:
            own.append(f"{value:.2f}{f' ({m})' if several else ''}")
    lines += ["", f"The same network, schedule and inference, trained once on our final pseudo masks of the "
              f"training images (made from image-level labels only: the {', '.join(trained_on)} masks) and once on "
              f"their ground-truth masks; the ratio is the share of the fully supervised val mIoU that the weak "
              f"labels reach (100% = they cost nothing)." +
              (f" For reference, those pseudo masks themselves score {', '.join(own)} on val (made the same way; "
               f"they need each image's labels, the network does not)." if own else "")]
    return lines


def make_figure(cfg, work: Path, paths: dict, rows: int, with_saliency: bool = False) -> Path:
    """Grid of validation images (training images when there is no validation run): image | ground truth |
    [saliency x label] | per path: single-scale CAM, fused CAM, final mask (+CRF)."""
    from .data.voc import VOCLayout
    from .io import load_cam_dict, load_label_png, make_panel, overlay, save_image

    layout = VOCLayout.from_config(cfg)
    first = next(iter(paths.values()))
    split = "val" if first["folders"]["val"] else "train"
    final_dirs = {m: Path(p["folders"][split][p["default_column"]]) for m, p in paths.items()}
    sub = {m: CRF_PNG if (d / CRF_PNG).is_dir() else CAM_PNG for m, d in final_dirs.items()}
    m0 = next(iter(paths))
    ids = sorted(p.stem for p in (final_dirs[m0] / sub[m0]).glob("*.png"))[:rows]
    several = len(paths) > 1
    strips = []
    for image_id in ids:
        image = layout.load_image(image_id)
        tiles, titles = [image], ["image"]
        gt_path = layout.mask_path(image_id)
        tiles.append(overlay(image, label=load_label_png(gt_path)) if gt_path and gt_path.is_file() else image)
        titles.append("ground truth")
        baseline = work / f"baseline_saliency_{split}" / CAM_PNG / f"{image_id}.png"
        if with_saliency and baseline.is_file():
            tiles.append(overlay(image, label=load_label_png(baseline)))
            titles.append("saliency x label")
        for m, p in paths.items():
            for column, title in ((SINGLE, "single-scale CAM"), (FUSED, "fused CAM")):
                if several and column == SINGLE:
                    continue
                cams = load_cam_dict(Path(p["folders"][split][column]) / CAM_NPY / f"{image_id}.npy")
                heat = np.max(np.stack(list(cams.values())), 0) if cams else np.zeros(image.shape[:2], np.float32)
                tiles.append(overlay(image, heat=heat))
                titles.append(f"{m}: {title}" if several else title)
            if p["default_column"] != FUSED:   # (--cams-only: the fused CAM is the last column)
                tiles.append(overlay(image, label=load_label_png(final_dirs[m] / sub[m] / f"{image_id}.png")))
                titles.append((f"{m}: " if several else "") + "final mask" + (" (CRF)" if sub[m] == CRF_PNG else ""))
        strips.append(make_panel(tiles, titles))
    if not strips:
        return Path()
    width = max(s.shape[1] for s in strips)
    grid = np.concatenate([np.pad(s, ((0, 6), (0, width - s.shape[1]), (0, 0)), constant_values=255)
                           for s in strips], 0)
    return save_image(work / "figure.jpg", grid)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Run and measure the whole pipeline (stages 0-3 + CRF; "
                                                 "--segmentation: stage 4 too).")
    parser.add_argument("--config", default=os.environ.get("CONFIG", "demo"))
    parser.add_argument("--methods", default="",
                        help="comma list of stage-0 paths, e.g. cam,eps (default: the config's train_cls.method)")
    parser.add_argument("--denoise", choices=("default", "both"), default="default",
                        help="stage 2 with the config's denoise setting only, or with both settings (ablation)")
    parser.add_argument("--refiners", default="",
                        help=f"comma list of refiners to chain after stages 1 and 3: {', '.join(REFINERS)}")
    parser.add_argument("--baselines", action="store_true",
                        help="also score the saliency x image label baseline (runs the saliency step)")
    parser.add_argument("--segmentation", action="store_true",
                        help="also stage 4: the segmentation network on each path's final pseudo masks and, once, "
                             "its fully supervised twin on the ground truth; val mIoU and their ratio")
    parser.add_argument("--cams-only", action="store_true",
                        help="stages 0 and 1 only: single-scale and fused CAM mIoU (and wall time) per path, e.g. "
                             "to compare stage-0 methods (docs/seed_methods.md)")
    parser.add_argument("--subset", type=int, default=None, metavar="N",
                        help="score every column on N ids of each list (spread evenly) and run the refiners on "
                             "those only, e.g. A2GNN on a CPU (= pipeline.subset=N)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    from .runtime import expected_errors

    with expected_errors():
        cfg = load_config(args.config, args.overrides + ([] if args.subset is None else
                                                         [f"pipeline.subset={args.subset}"]))
        variants = [False, True] if args.denoise == "both" else None
        methods = [m.strip() for m in args.methods.split(",") if m.strip()] or None
        refiners = [r.strip() for r in args.refiners.split(",") if r.strip()]
        summary = run_pipeline(cfg, variants, methods=methods, baselines=args.baselines, refiners=refiners,
                               segmentation=args.segmentation, cams_only=args.cams_only)
    print()
    print(format_summary(summary))
    print(f"overlays: {summary['work_dir']}/*/overlays/   figure: {summary['figure']}   "
          f"summary: {summary['work_dir']}/summary.md")


if __name__ == "__main__":
    main()
