"""Stage 4: train the segmentation network on the pseudo masks (``python -m smaf.stages.train_seg`` /
``bash script/train_seg.sh``), or on the ground truth (``train_seg.masks=gt``: the fully supervised reference,
the same network, schedule and inference).

* Labels: ``train_seg.mask_dir`` (default: stage 3's ``pseudo_masks/crf_png``; any folder of ``<id>.png`` label
  maps, e.g. another repository's pseudo masks; 255 = ignored) for ``train_seg.train_list`` (default
  ``data.train_list``); with ``masks: gt`` the dataset's ``SegmentationClass(Aug)/``.
* Network (:mod:`smaf.models.deeplab`): ``train_seg.arch`` (``deeplab_v2``: ASPP 6/12/18/24 summed;
  ``deeplab_largefov``: DeepLab-v1) on ``model.backbone`` at ``model.output_stride``, weights
  ``train_seg.pretrained`` ('' = ``model.pretrained``: ImageNet, or a stage-0 ``final.pth``).
* Augmentation (:class:`smaf.data.segmentation.SegTrainTransform`): long side to ``train_seg.base_long`` (0 = as
  is), random scale in ``train_seg.scale_range``, flip, random ``train_seg.crop`` with 255 on the padding.
* Loss (:mod:`smaf.seg.loss`): ``train_seg.loss`` ``ce`` or ``balanced`` cross-entropy of the upsampled logits.
* Optimiser: ``train_seg.optimizer`` (poly SGD: backbone x1 / x2, head x10 / x20); AMP, DDP, exact resume and
  validation (single-scale mIoU on ``data.val_list``, at ``infer_seg.base_long``) through
  :func:`smaf.engine.train_loop`.

Outputs in ``<work_dir>/<train_seg.out_subdir>/``: ``final.pth`` (what stage-4 inference and ``python -m
smaf.predict`` load; its meta holds the class names), ``checkpoints/``, ``log.txt``, ``metrics.jsonl`` (loss,
pixel accuracy, val_miou), ``config.yaml``.
"""
from __future__ import annotations

from ..config import ConfigError
from ..data.segmentation import SegTrainDataset, SegTrainTransform, check_label_folder
from ..data.voc import VOCLayout, check_inputs, read_id_list
from ..engine import check_resume_checkpoint, check_training_section, train_loop
from ..models.deeplab import SEG_ARCHITECTURES, seg_spec
from ..models.registry import build_from_spec
from ..optim import build_optimizer
from ..run_layout import RunLayout
from ..runtime import pick, prepare_output, set_seed, stage_main
from ..seg.loss import LOSSES, segmentation_loss
from ..seg.validate import SegValidator

MASK_SOURCES = ("pseudo", "gt")


def make_seg_step(mode: str, device):
    """``step(model, batch, iteration) -> (loss, logs)``: :func:`smaf.seg.loss.segmentation_loss` of the network's
    logits against the batch's labels, for the training loop."""

    def step(model, batch, iteration):
        images = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True)
        return segmentation_loss(model(images), label, mode)

    return step


def mask_source(cfg, runs: RunLayout):
    """(label folder or None for the ground truth, description) of ``train_seg.masks``; a bad value is a
    ConfigError naming the key."""
    masks = str(cfg.train_seg.masks)
    if masks not in MASK_SOURCES:
        raise ConfigError(f"train_seg.masks={masks!r}: expected pseudo (train_seg.mask_dir) or gt (the dataset's "
                          f"ground truth, the fully supervised reference)")
    if masks == "gt":
        return None, "the ground-truth masks (fully supervised)"
    folder = runs.input("train_seg", "mask_dir")
    return folder, f"the label PNGs of {folder}"


def model_spec(cfg, layout) -> dict:
    """The architecture spec stage 4 trains (``train_seg.arch`` on ``model.backbone`` / ``model.output_stride``,
    ``train_seg.dilations`` or DeepLab's, the dataset's class names)."""
    sect = cfg.train_seg
    try:
        return seg_spec(str(sect.arch), layout.num_classes, cfg.model.backbone, int(cfg.model.output_stride),
                        class_names=layout.class_names, dilations=list(sect.dilations or []))
    except ValueError as err:
        raise ConfigError(f"train_seg.arch / train_seg.dilations: {err}") from None


def run(cfg):
    """Stage 4 training. Returns the path of ``final.pth``."""
    sect = cfg.train_seg
    runs = RunLayout(cfg)
    # every input is checked before anything is written: keys, lists, images, labels, validation masks, resume
    check_training_section(sect, "train_seg")
    if str(sect.loss) not in LOSSES:
        raise ConfigError(f"train_seg.loss={sect.loss!r}: expected one of {', '.join(LOSSES)}")
    if str(sect.arch) not in SEG_ARCHITECTURES:
        raise ConfigError(f"train_seg.arch={sect.arch!r}: expected one of {', '.join(SEG_ARCHITECTURES)}")
    layout = VOCLayout.from_config(cfg)
    transform = _transform(sect)
    mask_dir, source = mask_source(cfg, runs)
    list_path = pick(sect.train_list, cfg.data.train_list)
    ids = read_id_list(list_path)
    check_inputs(layout, ids, "train_seg.train_list")
    key = "train_seg.mask_dir"
    check_label_folder(layout, ids, mask_dir, key, runs.producer("train_seg", "mask_dir"))
    if sect.val_every:
        SegValidator.check_config_inputs(cfg, layout, sect.val_max_images)
    check_resume_checkpoint(sect, "train_seg", layout)
    spec = model_spec(cfg, layout)
    out_dir, logger, device, layout = prepare_output(cfg, "train_seg", layout=layout)
    set_seed(cfg.seed)
    dataset = SegTrainDataset(layout, ids, transform, mask_dir)
    pretrained = str(pick(sect.pretrained, cfg.model.pretrained) or "")
    model = build_from_spec(spec, pretrained=pretrained).to(device)
    validator = SegValidator.from_config(cfg, layout, sect.val_max_images, logger)
    args = spec["args"]
    rates = args.get("dilations", [args.get("dilation")])
    logger.info("stage 4: %s on %s (output stride %d, dilations %s, weights %s), %d classes + background; %d "
                "images with %s; crop %d, scale %s x %s, loss %s", spec["arch"], args["backbone"],
                args["output_stride"], rates, pretrained or "random init", layout.num_classes, len(ids), source,
                transform.crop, f"long side {transform.base_long}" if transform.base_long else "original size",
                list(transform.scale_range), sect.loss)
    return train_loop(cfg, sect, out_dir, logger, device, model, dataset, make_seg_step(str(sect.loss), device),
                      lambda total: build_optimizer(sect, model.param_groups(), total, "train_seg"),
                      validator=validator if sect.val_every else None)


def _transform(sect) -> SegTrainTransform:
    scale_range = list(sect.scale_range or [1.0, 1.0])
    if len(scale_range) != 2:
        raise ConfigError(f"train_seg.scale_range={list(sect.scale_range)}: expected [lo, hi], e.g. [0.5, 1.5]")
    try:
        return SegTrainTransform(int(sect.crop), scale_range, int(sect.base_long), bool(sect.flip),
                                 list(sect.jitter or []) or None)
    except ValueError as err:
        raise ConfigError(f"train_seg.crop / train_seg.scale_range: {err}") from None


def main(argv=None):
    stage_main(run, "Stage 4: train the segmentation network (DeepLab) on pseudo masks or the ground truth.", argv)


if __name__ == "__main__":
    main()
