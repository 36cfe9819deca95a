"""Stage 0: train the initial classifier (``bash script/train_cls.sh``).

``train_cls.method`` picks the method (:mod:`smaf.methods`), which brings its loss, its head and its config
keys (``train_cls.<method>``):

  * ``eps``: multilabel soft margin on the C foreground logits + the EPS saliency loss (tau, lam), needs
    ``SALImages/``; the network has C+1 outputs (background last).
  * ``cam``: multilabel soft margin only, for datasets without saliency; C outputs.
  * ``seam``: SEAM's PCM + equivariant regularisation on a rescaled view; C outputs.
  * ``ppc``: pixel-to-prototype contrast on ``seam`` or ``eps`` (``train_cls.ppc.base``).
  * ``sc_cam``: SC-CAM's sub-category rounds (extract -> k-means -> retrain, ``bash script/sc_cam.sh``): each round
    is a stage-0 folder ``<out_subdir>/round_<r>/``; ``final.pth`` is the last round's model.

docs/seed_methods.md describes the seed methods (constants, sources, commands).

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
from ..methods import get_method, method_names
from ..methods.sc_cam import run_rounds
from ..models import build_model
from ..optim import build_optimizer
from ..runtime import StageError, prepare_output, set_seed, stage_main


def method_options(cfg) -> Config:
    """The selected method's options ``train_cls.<method>`` (empty for a method without keys)."""
    return cfg.train_cls.get(cfg.train_cls.method) or Config()


def resolve_head(cfg) -> str:
    """The head the stage-0 method trains (eps -> smaf (C+1), cam -> cls (C), ppc -> its base's); an explicit
    model.head is checked."""
    method, head = get_method(cfg.train_cls.method), cfg.model.head
    needed = method.head_for(method_options(cfg))
    if head not in ("auto", needed):
        raise StageError(f"model.head={head} does not fit train_cls.method={method.name} (needs {needed}); "
                         f"use model.head=auto")
    return needed


def run(cfg):
    """Stage 0. Returns the path of ``final.pth`` (for ``sc_cam`` without a labels file: all of its rounds)."""
    sect = cfg.train_cls
    if sect.method == "sc_cam" and not str(method_options(cfg).get("labels_file") or ""):
        return run_rounds(cfg, train_classifier)
    return train_classifier(cfg)


def train_classifier(cfg):
    """One stage-0 training run of the selected method. Returns the path of ``final.pth``."""
    sect = cfg.train_cls
    method = get_method(sect.method)
    opts = method_options(cfg)
    method.check_options(opts, f"train_cls.{method.name}")
    head = resolve_head(cfg)
    saliency = method.needs_saliency_for(opts)
    # every input is checked before anything is written: keys, ids, images, saliency, validation masks, resume
    check_training_section(sect, "train_cls")
    BackgroundRule.from_section(cfg.inference, "inference")
    layout = VOCLayout.from_config(cfg)
    ids = layout.read_list(cfg.data.train_list)
    check_inputs(layout, ids, "data.train_list", saliency=saliency)
    if sect.val_every:
        CAMValidator.check_config_inputs(cfg, layout, sect.val_max_images)
    check_resume_checkpoint(sect, "train_cls", layout, head)
    out_dir, logger, device, layout = prepare_output(cfg, "train_cls", layout=layout)
    set_seed(cfg.seed)
    transform = JointTrainTransform(sect.crop, sect.resize_long, flip=True, jitter=sect.jitter)
    dataset = ClassificationDataset(layout, ids, transform, saliency=saliency)
    validator = CAMValidator.from_config(cfg, layout, sect.val_max_images, logger)
    model = build_model(Config(dict(cfg.model, head=head)), layout.num_classes, method.aux_heads(opts)).to(device)
    logger.info("stage 0: %s method, %s backbone (%s head), %d classes", method.name, cfg.model.backbone, head,
                layout.num_classes)
    step = method.make_step(opts, layout.num_classes, device)
    return train_loop(cfg, sect, out_dir, logger, device, model, dataset, step,
                      lambda total: build_optimizer(sect, model.param_groups(), total, "train_cls"),
                      validator=validator)


def main(argv=None):
    stage_main(run, f"Stage 0: train the initial classifier (train_cls.method: {' | '.join(method_names())}; "
                    f"docs/seed_methods.md).", argv)


if __name__ == "__main__":
    main()
