"""AffinityNet training (PSA; ``python -m smaf.stages.train_aff`` / ``bash script/train_aff.sh``).

1. Affinity labels from the CAM folder ``train_aff.cam_dir`` (default: stage 1's ``fusion/cam_npy``; any folder
   of CAM ``.npy`` dicts) for ``train_aff.train_list`` (:mod:`smaf.refine.affinity_labels`, rule
   ``train_aff.labels.*``: PSA's la/ha power background through the dense CRF, two constant scores, or the run's
   background rule +- a margin), in a CPU process pool, into ``<out>/aff_labels/<id>.png``.
2. AffinityNet (:mod:`smaf.models.affinity`, backbone ``model.backbone`` with ``model.pretrained``) trained
   through the shared training loop (:func:`smaf.engine.train_loop`: resumable checkpoints, AMP, DDP,
   ``train_aff.optimizer``) with ``train_aff.objective``: ``psa``, the PSA loss (bg+, fg+, neg pairs at radius
   ``train_aff.radius``); ``a2gnn``, A2GNN's affinity CNN (the PSA terms over the square window
   ``train_aff.a2gnn.window_radius`` + ``gcrf_weight`` x a gated-CRF term on the image colours,
   :func:`smaf.models.affinity.window_affinity_loss`; the network the A2GNN stage is meant to read).

Outputs in ``<work_dir>/<train_aff.out_subdir>/``: ``aff_labels/``, ``final.pth`` (what the random walk loads),
``checkpoints/``, ``log.txt``, ``metrics.jsonl`` (loss terms and pair counts), ``config.yaml``.
"""
from __future__ import annotations

from .. import dist
from ..cam.background import BackgroundRule
from ..data.transforms import JointTrainTransform
from ..engine import check_training_section, train_loop
from ..config import ConfigError
from ..models.affinity import affinity_loss, grid_colour, pair_affinities, source_crop, window_affinity_loss
from ..models.registry import build_from_spec
from ..optim import build_optimizer
from ..refine.affinity_labels import AffinityDataset, AffinityLabelParams, AffinityLabelRefiner, label_statistics
from ..refine.pool import cam_folder_ids, refine_folder
from ..run_layout import AFF_LABELS, RunLayout
from ..runtime import StageError, available_cores, check_positive, pick, prepare_output, set_seed, stage_main

STRIDE = 8
OBJECTIVES = ("psa", "a2gnn")


def make_affinity_step(radius: int, device, objective: str = "psa", a2gnn=None):
    """``step(model, batch, iteration) -> (loss, logs)`` for the training loop: the PSA affinity loss at
    ``radius`` (objective ``psa``), or A2GNN's window + gated-CRF loss with the ``a2gnn`` options (a mapping of
    window_radius, gcrf_weight, gcrf_xy, gcrf_rgb; objective ``a2gnn``)."""

    if objective == "a2gnn":   # (radius, gcrf_weight, xy, rgb_sigma) of window_affinity_loss, read once
        window = (int(a2gnn["window_radius"]), float(a2gnn["gcrf_weight"]), float(a2gnn["gcrf_xy"]),
                  float(a2gnn["gcrf_rgb"]))

    def step(model, batch, iteration):
        images = batch["image"].to(device, non_blocking=True)
        label = batch["aff_label"].to(device, non_blocking=True)
        f = model(images)
        if f.shape[-2:] != label.shape[-2:]:
            raise StageError(f"AffinityNet features {tuple(f.shape[-2:])} do not match the label grid "
                             f"{tuple(label.shape[-2:])}: the backbone must give stride-8 features")
        if objective == "a2gnn":
            rgb, valid = grid_colour(images, batch["valid"].to(device, non_blocking=True), STRIDE)
            return window_affinity_loss(f.float(), label, rgb, valid, *window, STRIDE)
        return affinity_loss(pair_affinities(f.float(), radius), label, radius)

    return step


def run(cfg):
    """AffinityNet training. Returns the path of ``final.pth``."""
    sect = cfg.train_aff
    runs = RunLayout(cfg)
    cam_dir = runs.input("train_aff", "cam_dir")
    label_params = AffinityLabelParams.from_config(sect.labels)   # bad values fail before any output
    bg_rule = BackgroundRule.from_section(cfg.inference, "inference")
    check_training_section(sect, "train_aff")   # crop, resize_long, lengths: before the crop is used below
    crop, radius = int(sect.crop), int(sect.radius)
    objective = str(sect.objective)
    if objective not in OBJECTIVES:
        raise ConfigError(f"train_aff.objective='{objective}': expected one of {', '.join(OBJECTIVES)}")
    if objective == "a2gnn":
        opts = sect.a2gnn
        check_positive(opts, "train_aff.a2gnn", ("window_radius",))
        for key, low in (("gcrf_weight", 0.0), ("gcrf_xy", 1e-9), ("gcrf_rgb", 1e-9)):
            value = opts.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
                raise ConfigError(f"train_aff.a2gnn.{key}={value!r}: expected a number "
                                  f"{'>= 0 (0 turns the gated-CRF term off)' if low == 0 else '> 0'}")
    if crop % STRIDE:
        raise StageError(f"train_aff.crop={crop}: must be a multiple of {STRIDE} (PSA: 448)")
    try:   # the PSA pairs need a grid of at least r x (2r - 1) (the A2GNN window pads the grid instead)
        if objective == "psa":
            source_crop(crop // STRIDE, crop // STRIDE, radius)
    except ValueError as err:
        raise StageError(f"train_aff.crop={crop} / train_aff.radius={radius}: {err}") from None
    out_dir, logger, device, layout = prepare_output(cfg, "train_aff")
    set_seed(cfg.seed)
    list_path = pick(sect.train_list, cfg.data.train_list)
    ids = cam_folder_ids(layout, cam_dir, list_path, "train_aff.cam_dir", runs.producer("train_aff", "cam_dir"))
    label_dir = out_dir / AFF_LABELS
    workers = sect.label_workers or available_cores()
    logger.info("affinity labels (%s) for %d images from %s with %d workers -> %s", label_params.mode, len(ids),
                cam_dir, workers, label_dir)
    refine_folder(layout, cam_dir, label_dir, dist.shard(ids), AffinityLabelRefiner(label_params, bg_rule), workers,
                  desc="affinity labels")
    dist.barrier()
    if dist.is_main():
        stats = label_statistics(label_dir, ids[:200])
        logger.info("affinity labels (first %d images): background %.1f%%, foreground %.1f%%, unknown %.1f%%",
                    min(200, len(ids)), 100 * stats["background"], 100 * stats["foreground"], 100 * stats["unknown"])
    transform = JointTrainTransform(crop, sect.resize_long, flip=True, jitter=sect.jitter)
    dataset = AffinityDataset(layout, ids, transform, label_dir, STRIDE)
    spec = {"arch": "affinity_net", "args": {"backbone": cfg.model.backbone,
                                             "output_stride": int(cfg.model.output_stride)}}
    model = build_from_spec(spec, pretrained=str(cfg.model.pretrained or "")).to(device)
    logger.info("AffinityNet on %s (output stride %d, features at stride 8), crop %d, %s", cfg.model.backbone,
                cfg.model.output_stride, crop,
                f"PSA loss at radius {radius}" if objective == "psa" else
                f"A2GNN loss: window radius {sect.a2gnn.window_radius} + {sect.a2gnn.gcrf_weight} x gated CRF "
                f"(xy {sect.a2gnn.gcrf_xy}, rgb {sect.a2gnn.gcrf_rgb})")
    step = make_affinity_step(radius, device, objective, sect.get("a2gnn"))
    return train_loop(cfg, sect, out_dir, logger, device, model, dataset, step,
                      lambda total: build_optimizer(sect, model.param_groups(), total, "train_aff"))


def main(argv=None):
    stage_main(run, "AffinityNet (PSA): affinity labels from a CAM folder, then training with the PSA loss "
                    "(or A2GNN's window + gated-CRF loss: train_aff.objective=a2gnn).", argv)


if __name__ == "__main__":
    main()
