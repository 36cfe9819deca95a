"""Stage 0: train the initial classifier (``bash script/train_cls.sh``).

``train_cls.loss``:
  * ``eps``: multilabel soft margin on the C foreground logits + the EPS saliency loss (tau, lam), needs
    ``SALImages/``; the network has C+1 outputs (background last).
  * ``cam``: multilabel soft margin only, for datasets without saliency; C outputs.

Outputs in ``<work_dir>/train_cls/``: ``final.pth`` (the model stage 1 loads), ``checkpoints/iter_*.pth``
(full training state, ``resume=auto`` continues from the latest), ``log.txt``, ``metrics.jsonl``,
``config.yaml``.
"""
from __future__ import annotations

from ..cam import BackgroundRule
from ..checkpoint import model_meta
from ..data.transforms import JointTrainTransform
from ..data.voc import ClassificationDataset
from ..engine import Validator, train_loop
from ..losses import eps_saliency_loss, multilabel_soft_margin
from ..models import build_model
from .common import StageError, prepare_output, set_seed

LOSSES = ("eps", "cam")


def resolve_head(cfg) -> str:
    """The head the stage-0 loss needs: eps -> smaf (C+1), cam -> cls (C); an explicit choice is checked."""
    loss, head = cfg.train_cls.loss, cfg.model.head
    if loss not in LOSSES:
        raise StageError(f"train_cls.loss={loss!r}: expected one of {', '.join(LOSSES)}")
    needed = "smaf" if loss == "eps" else "cls"
    if head not in ("auto", needed):
        raise StageError(f"model.head={head} does not fit train_cls.loss={loss} (needs {needed}); use model.head=auto")
    return needed


def make_step(loss_kind: str, num_classes: int, tau: float, lam: float, device):
    """The stage-0 step: ``(model, batch, iteration) -> (loss, logs)``."""

    def step(model, batch, iteration):
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        logits, cam, _ = model(images)
        loss_cls = multilabel_soft_margin(logits[:, :num_classes], labels)
        if loss_kind == "cam":
            return loss_cls, {}
        saliency = batch["saliency"].to(device, non_blocking=True)
        loss_sal, _ = eps_saliency_loss(cam, saliency, labels, tau=tau, lam=lam)
        return loss_cls + loss_sal, {"cls": float(loss_cls.detach()), "sal": float(loss_sal.detach())}

    return step


def run(cfg):
    """Stage 0. Returns the path of ``final.pth``."""
    sect = cfg.train_cls
    head = resolve_head(cfg)
    out_dir, logger, device, layout = prepare_output(cfg, "train_cls", "train_cls")
    val_rule = BackgroundRule.from_section(cfg.fusion, "fusion")   # a bad rule fails before the model is built
    set_seed(cfg.seed)
    ids = layout.read_list(cfg.data.train_list)
    transform = JointTrainTransform(sect.crop, sect.resize_long, flip=True, jitter=sect.jitter)
    dataset = ClassificationDataset(layout, ids, transform, saliency=sect.loss == "eps")
    if sect.loss == "eps" and ids:
        layout.load_saliency(ids[0])  # fail now, with the fix in the message, rather than inside a worker
    model_cfg = dict(cfg.model, head=head)
    from ..config import Config

    model = build_model(Config(model_cfg), layout.num_classes).to(device)
    meta = model_meta(model, cfg.model.backbone, cfg.model.output_stride)  # build_model enforces 8 for resnet38d
    validator = Validator(cfg, layout, cfg.data.val_list, sect.val_max_images, val_rule, device, logger)
    logger.info("stage 0: %s loss, %s backbone (%s head), %d classes", sect.loss, cfg.model.backbone, head,
                layout.num_classes)
    step = make_step(sect.loss, layout.num_classes, sect.tau, sect.lam, device)
    return train_loop(cfg, sect, out_dir, logger, device, model, dataset, step, meta, validator=validator)


def main(argv=None):
    from .common import stage_main

    stage_main(run, "Stage 0: train the initial classifier (EPS or plain CAM).", argv)


if __name__ == "__main__":
    main()
