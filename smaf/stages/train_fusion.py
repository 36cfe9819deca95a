"""Stage 2: self-training with fused maps (``bash script/train_fusion.sh``).

Student and EMA teacher start from the stage-0 model (a plain ``cam`` classifier gets a fresh background
channel: the target trains it). Each training image comes with its fused map M from stage 1, resized,
flipped and cropped together with the image; the teacher sees the whole image resized to the crop size.

Target at 1/``target_stride`` of the crop: T = [M y (x w); bg] / max over channels (reactivation), where
the optional denoising weights w_k = ReLU(cos(f_teacher, prototype_k)) are computed on the teacher's
whole-image features and mapped into the crop with the transform parameters. Loss = loss_weight x
MSE(softmax(student cam), T). After each step the teacher is an EMA of the student and the prototypes
move towards the teacher's class-mean features (momentum ``proto_momentum``).

Inputs (explicit keys of this section, defaults from :mod:`smaf.run_layout`): ``train_fusion.checkpoint`` (the
stage-0 model) and ``train_fusion.fusion_dir`` (stage 1's folder: ``cam_npy/`` and ``prototypes.pt``).
Outputs in ``<work_dir>/<train_fusion.out_subdir>/``: ``final.pth`` (student, used by stage 3), ``final_teacher.pth``
(EMA teacher, written first), ``checkpoints/``, ``log.txt``, ``metrics.jsonl``, ``config.yaml``.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from .. import dist
from ..cam.prototypes import PrototypeBank, load_prototypes
from ..cam.validate import CAMValidator
from ..checkpoint import load_model
from ..data.transforms import JointTrainTransform, crop_to_image_grid
from ..data.voc import ClassificationDataset, collate_train
from ..engine import ModuleState, ema_update, train_loop
from ..losses import prototype_weights, self_training_loss, self_training_target
from ..optim import build_optimizer
from ..run_layout import CAM_NPY, FINAL_TEACHER, PROTOTYPES, RunLayout
from ..runtime import StageError, pick, prepare_output, set_seed, stage_main


def crop_weights(weights_full: torch.Tensor, params: list, size: int) -> torch.Tensor:
    """Map whole-image maps (B, K, h, w) into each sample's crop geometry at size x size (zero on padding)."""
    grid = torch.from_numpy(np.stack([crop_to_image_grid(p, size) for p in params])).to(weights_full.device)
    return F.grid_sample(weights_full, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def calibrate_background_head(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Prepare a plain CAM classifier that just got a background channel for the softmax of stage 2.

    A classifier trained with the multilabel loss alone has CAM logits of tens at its objects, so a softmax
    over them is saturated and the self-training MSE has almost no gradient (the loss stays flat). The C
    trained rows are divided by the mean peak CAM of the labelled classes on ``images`` (B, 3, H, W), which
    keeps every map's shape and ranking but puts logits near [0, 1], and the new background row starts at
    zero (background logit 0 everywhere). Returns the divisor.
    """
    c = model.num_classes
    _, cam, _ = model(images)
    peaks = cam[:, :c].flatten(2).amax(2)
    divisor = float(((peaks * labels).sum() / labels.sum().clamp(min=1)).clamp(min=1.0))
    model.classifier.weight[:c] /= divisor
    model.classifier.weight[c] = 0.0
    return divisor


def make_step(student, teacher, bank: PrototypeBank, num_classes: int, target_size: int, bg_score: float,
              loss_weight: float, denoise: bool, ema: float, device):
    """The stage-2 step and its after-step update, for :func:`smaf.engine.train_loop`.

    ``step(model, batch, iteration) -> (loss, logs)``: teacher forward on the whole image (no gradient), the
    target (fused map of the crop at ``target_size``, optionally prototype-weighted) and the student's loss;
    ``after_step(iteration)``: EMA update of the teacher from ``student`` and the prototype update from the
    teacher's class means of the step (summed over ranks)."""
    pending = {}

    def step(model, batch, iteration):
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        fused = F.interpolate(batch["soft"].to(device, non_blocking=True), size=(target_size, target_size),
                              mode="bilinear", align_corners=False)
        with torch.no_grad():
            _, cam_t, f_t = teacher(batch["full"].to(device, non_blocking=True))
            weights = None
            if denoise:
                w_full = prototype_weights(f_t, bank.prototypes[:num_classes])
                weights = crop_weights(w_full, batch["params"], target_size)
            target = self_training_target(fused, labels, bg_score, weights)
            pending["stats"] = bank.batch_class_means(cam_t, f_t, labels)
        _, cam_s, _ = model(images)
        loss = self_training_loss(cam_s, target, loss_weight)
        return loss, {}

    def after_step(iteration):
        ema_update(teacher, student, ema)
        sums, counts = pending.pop("stats")
        bank.update(dist.all_reduce_sum(sums), dist.all_reduce_sum(counts))

    return step, after_step


def build_self_training(student, sect, num_classes: int, prototypes: torch.Tensor, min_pixels: int, device):
    """Everything stage 2 trains with, from the student (already on ``device``, with its background channel)
    and the ``train_fusion`` section: ``(teacher, bank, step, after_step)``; the teacher is a frozen copy of
    the student, the bank holds ``prototypes`` (C+1, D). Also used by the speed benchmark."""
    teacher = copy.deepcopy(student).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    bank = PrototypeBank(prototypes.to(device), sect.proto_momentum, min_pixels)
    step, after_step = make_step(student, teacher, bank, num_classes, sect.crop // sect.target_stride,
                                 sect.bg_score, sect.loss_weight, sect.denoise, sect.ema, device)
    return teacher, bank, step, after_step


def run(cfg):
    """Stage 2. Returns the path of ``final.pth`` (the student)."""
    sect = cfg.train_fusion
    out_dir, logger, device, layout = prepare_output(cfg, "train_fusion")
    # the student is validated like stage 3 will use it: single-scale, with the inference section's rule
    # (built first: a bad rule fails before any model is loaded)
    validator = CAMValidator.from_config(cfg, layout, sect.val_max_images, logger)
    set_seed(cfg.seed)
    num_classes = layout.num_classes
    ids = layout.read_list(pick(sect.train_list, cfg.data.train_list))
    runs = RunLayout(cfg)
    fusion_dir = runs.input("train_fusion", "fusion_dir")
    proto_path = fusion_dir / PROTOTYPES
    if not proto_path.is_file():
        raise StageError(f"'{proto_path}' not found: run {runs.producer('train_fusion', 'fusion_dir')} first")
    ckpt = runs.input("train_fusion", "checkpoint")
    student, _ = load_model(ckpt, producer=runs.producer("train_fusion", "checkpoint"), device="cpu")
    if student.num_classes != num_classes:
        raise StageError(f"{ckpt} was trained for {student.num_classes} classes but the dataset has {num_classes}")
    transform = JointTrainTransform(sect.crop, sect.resize_long, flip=True, jitter=None)
    dataset = ClassificationDataset(layout, ids, transform, soft_dir=fusion_dir / CAM_NPY, full_size=sect.crop)
    student = student.to(device)
    if not student.has_background:
        student.add_background_channel()
        calib = collate_train([dataset[(i, int(cfg.seed) + i)] for i in range(min(len(dataset), sect.batch_size))])
        divisor = calibrate_background_head(student.eval(), calib["full"].to(device), calib["labels"].to(device))
        logger.info("stage-0 model is a plain CAM classifier: added a background channel (zero-initialised) and "
                    "divided the class rows by the mean peak CAM %.2f so the softmax starts unsaturated", divisor)
    protos = load_prototypes(proto_path)
    teacher, bank, step, after_step = build_self_training(student, sect, num_classes, protos["prototypes"],
                                                          protos["min_pixels"], device)
    target_size = sect.crop // sect.target_stride
    logger.info("stage 2: %d images, fused maps from %s, denoise %s, target %dx%d, target background score %.2f",
                len(ids), fusion_dir, sect.denoise, target_size, target_size, sect.bg_score)
    return train_loop(cfg, sect, out_dir, logger, device, student, dataset, step,
                      lambda total: build_optimizer(sect, student.param_groups(), total, "train_fusion"),
                      validator=validator, extras={"teacher": ModuleState(teacher), "prototypes": bank},
                      after_step=after_step, final_extras=lambda: {FINAL_TEACHER: teacher})


def main(argv=None):
    stage_main(run, "Stage 2: self-training with fused multi-scale attention maps.", argv)


if __name__ == "__main__":
    main()
