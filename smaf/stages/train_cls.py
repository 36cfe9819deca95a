"""Stage 0: train the initial classifier (``bash script/train_cls.sh``).

``train_cls.method`` picks the method (:mod:`smaf.methods`), which brings its loss, its head and its config
keys (``train_cls.<method>``):

  * ``eps``: multilabel soft margin on the C foreground logits + the EPS saliency loss (tau, lam), needs
    ``SALImages/``; the network has C+1 outputs (background last).
  * ``cam``: multilabel soft margin only, for datasets without saliency; C outputs.

Outputs in ``<work_dir>/<train_cls.out_subdir>/``: ``final.pth`` (the model stage 1 loads),
``checkpoints/iter_*.pth`` (full training state, ``resume=auto`` continues from the latest), ``log.txt``,
``metrics.jsonl``, ``config.yaml``.
"""
from __future__ import annotations

from ..cam.background import BackgroundRule
from ..cam.validate import CAMValidator
from ..config import Config
from ..data.transforms import JointTrainTransform
from ..data.voc import ClassificationDataset, VOCLayout, check_inputs
from ..engine import check_resume_checkpoint, check_training_section, train_loop
from ..methods import get_method
from ..models import build_model
from ..optim import build_optimizer
from ..runtime import StageError, prepare_output, set_seed, stage_main


def resolve_head(cfg) -> str:
    """The head the stage-0 method trains (eps -> smaf (C+1), cam -> cls (C)); an explicit model.head is checked."""
    method, head = get_method(cfg.train_cls.method), cfg.model.head
    if head not in ("auto", method.head):
        raise StageError(f"model.head={head} does not fit train_cls.method={method.name} (needs {method.head}); "
                         f"use model.head=auto")
    return method.head


def run(cfg):
    """Stage 0. Returns the path of ``final.pth``."""
    sect = cfg.train_cls
    method = get_method(sect.method)
    head = resolve_head(cfg)
    # every input is checked before anything is written: keys, ids, images, saliency, validation masks, resume
    check_training_section(sect, "train_cls")
    BackgroundRule.from_section(cfg.inference, "inference")
    layout = VOCLayout.from_config(cfg)
    ids = layout.read_list(cfg.data.train_list)
    check_inputs(layout, ids, "data.train_list", saliency=method.needs_saliency)
    if sect.val_every:
        CAMValidator.check_config_inputs(cfg, layout, sect.val_max_images)
    check_resume_checkpoint(sect, "train_cls", layout, head)
    out_dir, logger, device, layout = prepare_output(cfg, "train_cls", layout=layout)
    set_seed(cfg.seed)
    transform = JointTrainTransform(sect.crop, sect.resize_long, flip=True, jitter=sect.jitter)
    dataset = ClassificationDataset(layout, ids, transform, saliency=method.needs_saliency)
    validator = CAMValidator.from_config(cfg, layout, sect.val_max_images, logger)
    model = build_model(Config(dict(cfg.model, head=head)), layout.num_classes).to(device)
    logger.info("stage 0: %s method, %s backbone (%s head), %d classes", method.name, cfg.model.backbone, head,
                layout.num_classes)
    step = method.make_step(sect.get(method.name) or Config(), layout.num_classes, device)
    return train_loop(cfg, sect, out_dir, logger, device, model, dataset, step,
                      lambda total: build_optimizer(sect, model.param_groups(), total, "train_cls"),
                      validator=validator)


def main(argv=None):
    stage_main(run, "Stage 0: train the initial classifier (train_cls.method: eps or cam).", argv)


if __name__ == "__main__":
    main()
