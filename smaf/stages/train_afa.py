"""AFA end to end, single stage (``python -m smaf.stages.train_afa`` / ``bash script/train_afa.sh``; docs/afa.md):
classifier, affinity from attention and segmentation decoder trained together from image-level labels
(related-methods.md §7).

Per iteration t (0-based) on a batch of crops (:class:`~smaf.data.voc.ClassificationDataset`: random rescale in
``train_afa.scale_range`` (or a random long side in ``train_afa.resize_long`` for large photos), flip, crop
``train_afa.crop``, no colour jitter):

1. one forward pass with gradients: class logits, CAM, affinity (B, N, N), segmentation logits
   (:class:`smaf.models.afa.AFANet`); L_cls = multilabel soft margin of the GMP logits;
2. for t < ``cam_iters`` (2000) the loss is L_cls alone;
3. after that, the labels (:mod:`smaf.refine.afa`, no gradients): the multi-scale CAM (``cam_scales``), the PAR
   label (two background scores ``bg_high`` / ``bg_low``, the ``par`` section's PAR constants), the affinity
   labels on the pass's grid (``radius``) -> L_aff; the L_seg target is the PAR label for t < ``propagate_iters``
   (6000), then the propagated label (the CAM carried one step by the largest scale's affinity, PAR-refined);
   loss = L_cls + ``seg_weight`` L_seg + ``aff_weight`` L_aff (0.1 and 0.1).

AdamW with warm-up (``train_afa.optimizer: adamw``, :func:`smaf.optim.build_adamw`: encoder x1, new layers x10,
frozen encoder LayerNorms); AMP, DDP (the decoder's BatchNorm becomes SyncBatchNorm), exact resume, checkpoints
and validation (single-scale val mIoU of the decoder on ``data.val_list``, at ``infer_afa.base_long``) through
:func:`smaf.engine.train_loop`.

Outputs in ``<work_dir>/<train_afa.out_subdir>/``: ``final.pth`` (what ``infer_afa`` and ``python -m
smaf.predict`` load), ``checkpoints/``, ``log.txt``, ``metrics.jsonl`` (loss, loss_cls, loss_seg, loss_aff,
label shares, val_miou), ``config.yaml``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import dist
from ..config import ConfigError
from ..data.transforms import JointTrainTransform, crop_side, long_side_range
from ..data.voc import ClassificationDataset, VOCLayout, check_inputs
from ..engine import check_resume_checkpoint, check_training_section, train_loop
from ..losses import afa_affinity_loss, background_foreground_ce, multilabel_soft_margin
from ..models import BACKBONE_OUTPUT_STRIDES
from ..models.afa import afa_spec
from ..models.registry import build_from_spec
from ..optim import build_optimizer
from ..refine.afa import (IGNORE, affinity_labels, multi_scale_cam, propagate_cams, threshold_cam_labels)
from ..refine.par import PAR, PARParams, refine_cams_with_background, refine_scores_with_background
from ..runtime import pick, prepare_output, set_seed, stage_main
from ..seg.validate import SegValidator

AFA_BACKBONES = tuple(f"mit_b{i}" for i in range(6)) + ("vit_s14_focus",)


@dataclass(frozen=True)
class AFASchedule:
    """Which losses count at iteration t (0-based): L_cls alone for t < ``cam_iters``; then
    L_cls + ``seg_weight`` L_seg + ``aff_weight`` L_aff, L_seg against the PAR label for t < ``propagate_iters``
    and against the propagated label after (AFA: 2000, 6000, 0.1, 0.1)."""

    cam_iters: int = 2000
    propagate_iters: int = 6000
    seg_weight: float = 0.1
    aff_weight: float = 0.1

    def weights(self, t: int) -> tuple[float, float]:
        """(seg weight, aff weight) at iteration t: (0, 0) during the CAM-only phase."""
        return (0.0, 0.0) if t < self.cam_iters else (self.seg_weight, self.aff_weight)

    def seg_target(self, t: int) -> str:
        """'par' (the PAR label) or 'propagated' (the PAR-refined propagated label) at iteration t."""
        return "par" if t < self.propagate_iters else "propagated"


@dataclass(frozen=True)
class AFALabelParams:
    """Constants of AFA's labels (config ``train_afa``): CAM scales, the two background scores, the window."""

    cam_scales: tuple = (1.0, 0.5, 1.5)
    bg_high: float = 0.55
    bg_low: float = 0.35
    radius: int = 8


def afa_losses(model, images: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, iteration: int,
               schedule: AFASchedule, params: AFALabelParams, par: PAR, par_scale: float
               ) -> tuple[torch.Tensor, dict]:
    """AFA's loss of one batch at ``iteration`` (module docstring).

    Args:
        model: the :class:`~smaf.models.afa.AFANet`, or its DDP wrapper (the gradient pass goes through it).
        images: (B, 3, H, W) normalised crops; labels: (B, C) image-level labels; valid: (B, H, W), 1 on image.
        par, par_scale: the PAR module and the fraction of the crop it runs at (0.5).

    Returns (loss, logs) with logs ``loss_cls`` and, after the CAM-only phase, ``loss_seg``, ``loss_aff``,
    ``label_ignored`` (% of pixels 255 in the L_seg target) and ``par_changed`` (% of the pixels whose
    thresholded CAM label PAR changed).
    """
    net = getattr(model, "module", model)
    out = model(images, train_outputs=True)
    loss_cls = multilabel_soft_margin(out.cls_logits, labels)
    seg_w, aff_w = schedule.weights(iteration)
    if not (seg_w or aff_w):
        # every parameter stays in the graph (DDP needs a gradient for each), with weight 0
        unused = 0.0 * (out.seg_logits.float().sum() + out.affinity.sum())
        return loss_cls + unused, {"loss_cls": float(loss_cls.detach())}
    propagated = schedule.seg_target(iteration) == "propagated"
    cams, big_affinity, big_grid = multi_scale_cam(net, images, labels, params.cam_scales, with_affinity=propagated)
    par_label = refine_cams_with_background(par, images, cams, labels, params.bg_high, params.bg_low, par_scale,
                                            valid > 0.5, IGNORE)
    target = par_label
    if propagated:
        high, low = (propagate_cams(cams, big_affinity, big_grid, labels, score, params.radius)
                     for score in (params.bg_high, params.bg_low))
        target = refine_scores_with_background(par, images, high, low, labels, par_scale, valid > 0.5, IGNORE)
    loss_aff, counts = afa_affinity_loss(out.affinity, affinity_labels(par_label, out.grid, params.radius, IGNORE))
    loss_seg = background_foreground_ce(out.seg_logits, target, IGNORE)
    with torch.no_grad():
        initial = threshold_cam_labels(cams, params.bg_high, params.bg_low, valid > 0.5, IGNORE)
        changed = float((initial != par_label).float().mean()) * 100.0
        ignored = float((target == IGNORE).float().mean()) * 100.0
    loss = loss_cls + seg_w * loss_seg + aff_w * loss_aff
    return loss, {"loss_cls": float(loss_cls.detach()), "loss_seg": float(loss_seg.detach()),
                  "loss_aff": float(loss_aff.detach()),
                  "label_ignored": ignored, "par_changed": changed, **counts}


def make_afa_step(schedule: AFASchedule, params: AFALabelParams, par_params: PARParams, device):
    """``step(model, batch, iteration) -> (loss, logs)`` of :func:`afa_losses`, for the training loop."""
    par = par_params.module().to(device)

    def step(model, batch, iteration):
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        valid = batch["valid"].to(device, non_blocking=True)
        return afa_losses(model, images, labels, valid, iteration, schedule, params, par, par_params.scale)

    return step


def schedule_from_config(sect) -> AFASchedule:
    """The loss schedule of the ``train_afa`` section; bad values are ConfigErrors naming the key."""
    schedule = AFASchedule(int(sect.cam_iters), int(sect.propagate_iters), float(sect.seg_weight),
                           float(sect.aff_weight))
    if schedule.cam_iters < 0 or schedule.propagate_iters < schedule.cam_iters:
        raise ConfigError(f"train_afa.cam_iters={schedule.cam_iters} / train_afa.propagate_iters="
                          f"{schedule.propagate_iters}: need 0 <= cam_iters <= propagate_iters (AFA: 2000, 6000)")
    if schedule.seg_weight < 0 or schedule.aff_weight < 0:
        raise ConfigError("train_afa.seg_weight / train_afa.aff_weight must be >= 0 (AFA: 0.1, 0.1)")
    return schedule


def label_params_from_config(sect) -> AFALabelParams:
    """The label constants of the ``train_afa`` section; bad values are ConfigErrors naming the key."""
    params = AFALabelParams(tuple(float(s) for s in (sect.cam_scales or [])), float(sect.bg_high),
                            float(sect.bg_low), int(sect.radius))
    if not params.cam_scales or min(params.cam_scales) <= 0:
        raise ConfigError(f"train_afa.cam_scales={list(sect.cam_scales)}: expected positive scales, e.g. "
                          f"[1.0, 0.5, 1.5]")
    if not 0 <= params.bg_low <= params.bg_high <= 1:
        raise ConfigError(f"train_afa.bg_low={params.bg_low} / bg_high={params.bg_high}: need 0 <= bg_low <= "
                          f"bg_high <= 1 (AFA: 0.35, 0.55)")
    if params.radius < 1:
        raise ConfigError(f"train_afa.radius={params.radius}: must be >= 1 (AFA: 8)")
    return params


def model_spec(cfg, layout) -> dict:
    """The architecture spec ``train_afa`` trains (``train_afa.backbone`` at ``train_afa.output_stride``)."""
    sect = cfg.train_afa
    backbone = str(sect.backbone)
    if backbone not in AFA_BACKBONES:
        raise ConfigError(f"train_afa.backbone={backbone!r}: AFA needs attention logits; expected one of "
                          f"{', '.join(AFA_BACKBONES)}")
    stride = int(sect.output_stride)
    if stride not in BACKBONE_OUTPUT_STRIDES[backbone]:
        valid = " or ".join(map(str, BACKBONE_OUTPUT_STRIDES[backbone]))
        raise ConfigError(f"train_afa.output_stride={stride}: {backbone} has {valid} (AFA on MiT: 16)")
    return afa_spec(layout.num_classes, backbone, stride, int(sect.attention_blocks), int(sect.decoder_dim),
                    layout.class_names)


def train_transform(sect) -> JointTrainTransform:
    """The crops of ``train_afa`` (section ``sect``): a random rescale of the original by ``scale_range`` (AFA),
    or, when ``resize_long`` = [lo, hi] is set, a random long side in it; then flip and a ``crop`` x ``crop``
    crop. One-line ConfigError for a bad range."""
    scale_range = list(sect.scale_range or [])
    if len(scale_range) != 2 or not 0 < float(scale_range[0]) <= float(scale_range[1]):
        raise ConfigError(f"train_afa.scale_range={scale_range}: expected [lo, hi] with 0 < lo <= hi (AFA: "
                          f"[0.5, 2.0])")
    # VOC photos are about 500 px, so AFA rescales the original; large photos (Pet: up to 1600 px) would give
    # crops of fur, so a set may draw the long side instead, as stage 0 does (then scale_range is not used)
    resize_long = long_side_range(sect.resize_long, "train_afa.resize_long")
    return JointTrainTransform(crop_side(sect.crop, "train_afa.crop"), resize_long, flip=bool(sect.flip),
                               jitter=list(sect.jitter or []), scale_range=None if resize_long else scale_range)


def run(cfg):
    """AFA training. Returns the path of ``final.pth``."""
    sect = cfg.train_afa
    # every input is checked before anything is written: keys, lists, images, validation masks, resume
    check_training_section(sect, "train_afa")
    schedule = schedule_from_config(sect)
    params = label_params_from_config(sect)
    par_params = PARParams.from_config(cfg.par)
    transform = train_transform(sect)
    layout = VOCLayout.from_config(cfg)
    ids = layout.read_list(pick(sect.train_list, cfg.data.train_list))
    check_inputs(layout, ids, "train_afa.train_list")
    if sect.val_every:
        SegValidator.check_config_inputs(cfg, layout, sect.val_max_images)
    check_resume_checkpoint(sect, "train_afa", layout)
    spec = model_spec(cfg, layout)
    out_dir, logger, device, layout = prepare_output(cfg, "train_afa", layout=layout)
    set_seed(cfg.seed)
    dataset = ClassificationDataset(layout, ids, transform)
    pretrained = str(sect.pretrained or "")
    model = build_from_spec(spec, pretrained=pretrained)
    if dist.is_distributed():
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    validator = SegValidator(layout, cfg.data.val_list, sect.val_max_images, cfg.infer_afa.base_long,
                             cfg.infer_afa.resize, cfg.amp, cfg.num_workers, logger)
    logger.info("AFA on %s (output stride %d, weights %s, %d affinity maps), %d classes; %d images, crop %d, "
                "%s; L_cls alone for %d iterations, then + %.2g L_seg + %.2g L_aff (L_seg on the "
                "propagated label from iteration %d)", spec["args"]["backbone"], spec["args"]["output_stride"],
                pretrained or "random init", model.affinity_head.proj.in_channels, layout.num_classes, len(ids),
                transform.crop, f"long side {list(transform.resize_long)}" if transform.resize_long
                else f"scale {list(transform.scale_range)}",
                schedule.cam_iters, schedule.seg_weight, schedule.aff_weight,
                schedule.propagate_iters)
    return train_loop(cfg, sect, out_dir, logger, device, model, dataset,
                      make_afa_step(schedule, params, par_params, device),
                      lambda total: build_optimizer(sect, model.param_groups(), total, "train_afa"),
                      validator=validator if sect.val_every else None)


def main(argv=None):
    stage_main(run, "AFA: classifier, affinity from attention and segmentation decoder trained together "
                    "(docs/afa.md).", argv)


if __name__ == "__main__":
    main()
