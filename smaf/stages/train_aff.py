"""AffinityNet training (PSA; ``python -m smaf.stages.train_aff`` / ``bash script/train_aff.sh``).

1. Affinity labels from the CAM folder ``train_aff.cam_dir`` (default: stage 1's ``fusion/cam_npy``; any folder
   of CAM ``.npy`` dicts) for ``train_aff.train_list`` (:mod:`smaf.refine.affinity_labels`, rule
   ``train_aff.labels.*``: PSA's la/ha power background through the dense CRF, two constant scores, or the run's
   background rule +- a margin), in a CPU process pool, into ``<out>/aff_labels/<id>.png``.
2. AffinityNet (:mod:`smaf.models.affinity`, backbone ``model.backbone`` with ``model.pretrained``) trained with
   the PSA loss (bg+, fg+, neg pairs at radius ``train_aff.radius``) through the shared training loop
   (:func:`smaf.engine.train_loop`: resumable checkpoints, AMP, DDP, ``train_aff.optimizer``).

Outputs in ``<work_dir>/<train_aff.out_subdir>/``: ``aff_labels/``, ``final.pth`` (what the random walk loads),
``checkpoints/``, ``log.txt``, ``metrics.jsonl`` (loss terms and pair counts), ``config.yaml``.
"""
from __future__ import annotations

from .. import dist
from ..cam.background import BackgroundRule
from ..data.transforms import JointTrainTransform
from ..engine import train_loop
from ..models.affinity import affinity_loss, pair_affinities, source_crop
from ..models.registry import build_from_spec
from ..optim import build_optimizer
from ..refine.affinity_labels import AffinityDataset, AffinityLabelParams, AffinityLabelRefiner, label_statistics
from ..refine.pool import cam_folder_ids, refine_folder
from ..run_layout import AFF_LABELS, RunLayout
from ..runtime import StageError, available_cores, pick, prepare_output, set_seed, stage_main

STRIDE = 8


def make_affinity_step(radius: int, device):
    """``step(model, batch, iteration) -> (loss, logs)`` of the PSA affinity loss, for the training loop."""

    def step(model, batch, iteration):
        images = batch["image"].to(device, non_blocking=True)
        label = batch["aff_label"].to(device, non_blocking=True)
        f = model(images)
        if f.shape[-2:] != label.shape[-2:]:
            raise StageError(f"AffinityNet features {tuple(f.shape[-2:])} do not match the label grid "
                             f"{tuple(label.shape[-2:])}: the backbone must give stride-8 features")
        return affinity_loss(pair_affinities(f.float(), radius), label, radius)

    return step


def run(cfg):
    """AffinityNet training. Returns the path of ``final.pth``."""
    sect = cfg.train_aff
    runs = RunLayout(cfg)
    cam_dir = runs.input("train_aff", "cam_dir")
    label_params = AffinityLabelParams.from_config(sect.labels)   # bad values fail before any output
    bg_rule = BackgroundRule.from_section(cfg.inference, "inference")
    crop, radius = int(sect.crop), int(sect.radius)
    if crop % STRIDE:
        raise StageError(f"train_aff.crop={crop}: must be a multiple of {STRIDE} (PSA: 448)")
    try:
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
    resize = list(sect.resize_long) if sect.resize_long else None
    transform = JointTrainTransform(crop, resize, flip=True, jitter=sect.jitter)
    dataset = AffinityDataset(layout, ids, transform, label_dir, STRIDE)
    spec = {"arch": "affinity_net", "args": {"backbone": cfg.model.backbone,
                                             "output_stride": int(cfg.model.output_stride)}}
    model = build_from_spec(spec, pretrained=str(cfg.model.pretrained or "")).to(device)
    logger.info("AffinityNet on %s (output stride %d, features at stride 8), radius %d, crop %d", cfg.model.backbone,
                cfg.model.output_stride, radius, crop)
    return train_loop(cfg, sect, out_dir, logger, device, model, dataset, make_affinity_step(radius, device),
                      lambda total: build_optimizer(sect, model.param_groups(), total, "train_aff"))


def main(argv=None):
    stage_main(run, "AffinityNet (PSA): affinity labels from a CAM folder, then training with the PSA loss.", argv)


if __name__ == "__main__":
    main()
