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
from ..data.voc import ClassificationDataset, VOCLayout, check_inputs, collate_train
from ..engine import ModuleState, check_resume_checkpoint, check_training_section, ema_update, train_loop
from ..cam.background import BackgroundRule
from ..losses import (eps_saliency_loss, prototype_similarity, prototype_weights, scale_matched_temperature, self_training_loss,
                      self_training_target, softmax_prototype_weights)
from ..optim import build_optimizer
from ..run_layout import CAM_NPY, FINAL_TEACHER, PROTOTYPES, RunLayout
from ..runtime import StageError, pick, prepare_output, set_seed, stage_main


DENOISE_RULES = ("softmax", "reference")
TARGET_BG = ("rule", "fixed")


def crop_weights(weights_full: torch.Tensor, params: list, size: int, padding_mode: str = "zeros") -> torch.Tensor:
    """Map whole-image maps (B, K, h, w) into each sample's crop geometry at size x size (``padding_mode`` of
    ``grid_sample`` on the crop's padding: zeros, or border to keep the nearest image value)."""
    grid = torch.from_numpy(np.stack([crop_to_image_grid(p, size) for p in params])).to(weights_full.device)
    return F.grid_sample(weights_full, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


@torch.no_grad()
def mean_labelled_peak(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean over the labelled (image, class) pairs of the peak CAM logit of ``model`` on ``images``
    (B, 3, H, W), labels (B, C); at least 1 (the divisor of the calibrations below)."""
    _, cam, _ = model(images)
    peaks = cam[:, :model.num_classes].flatten(2).amax(2)
    return float(((peaks * labels).sum() / labels.sum().clamp(min=1)).clamp(min=1.0))


@torch.no_grad()
def calibrate_background_head(model, images: torch.Tensor, labels: torch.Tensor, how: str = "weights") -> float:
    """Prepare a plain CAM classifier that just got a background channel for the softmax of stage 2.

    A classifier trained with the multilabel loss alone has CAM logits of tens at its objects, so a softmax
    over them is saturated and the self-training MSE has almost no gradient (the loss stays flat). The logits
    are divided by the mean peak CAM of the labelled classes on ``images`` (B, 3, H, W), which keeps every
    map's shape and ranking but puts logits near [0, 1], and the new background row starts at zero (background
    logit 0 everywhere). ``how``: ``weights`` divides the C trained rows (the previous rule: the rows are then
    tiny, so each update moves them far, relative to their size, and a zero background row grows by tens within
    a few steps); ``scale`` leaves the weights and multiplies the logits by a fixed 1/divisor
    (:meth:`CAMNet.set_logit_scale`), which keeps the updates in proportion. Returns the divisor.
    """
    c = model.num_classes
    divisor = mean_labelled_peak(model, images, labels)
    if how == "scale":
        model.set_logit_scale(model.logit_scale / divisor)
    else:
        model.classifier.weight[:c] /= divisor
    model.classifier.weight[c] = 0.0
    return divisor


@torch.no_grad()
def calibrate_logit_scale(model, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Multiply the logits of a model that has its background channel by 1/(mean peak CAM of the labelled
    classes on ``images``) (``calibration: scale_all``). Returns the divisor."""
    divisor = mean_labelled_peak(model, images, labels)
    model.set_logit_scale(model.logit_scale / divisor)
    return divisor


@torch.no_grad()
def fit_background_bias(model, images: torch.Tensor, labels: torch.Tensor, target: torch.Tensor,
                        align_corners: bool = False, valid: torch.Tensor | None = None) -> tuple:
    """Set the student's background bias so that its initial foreground/background partition reproduces the
    target's on a batch: the value b maximising the pixels where ``max over labelled c of z_c > z_bg + b`` agrees
    with the target's argmax being a labelled class (exact: the agreement only changes at the sorted gaps).

    Args: images (B, 3, H, W); labels (B, C); target (B, C+1, h, w) (:func:`smaf.losses.self_training_target`);
    valid: optional (B, h, w) image fraction per target pixel: only pixels mostly on the image count.
    Returns (b, fraction of the counted pixels whose fg/bg side agrees)."""
    model.add_background_bias(0.0)
    c = model.num_classes
    _, cam, _ = model(images)
    cam = F.interpolate(cam.float(), size=target.shape[-2:], mode="bilinear", align_corners=align_corners)
    fg_logit = cam[:, :c].masked_fill(labels[:, :, None, None] < 0.5, float("-inf")).amax(1)
    gap = (fg_logit - cam[:, c]).flatten()                  # a pixel is foreground iff gap > b
    is_fg = (target[:, :c].amax(1) >= target[:, c]).flatten()
    if valid is not None:
        keep = valid.flatten() > 0.5
        gap, is_fg = gap[keep], is_fg[keep]
    order = torch.argsort(gap)
    gap, is_fg = gap[order], is_fg[order].float()
    # b just above the k-th smallest gap (k = 0..N): pixels 0..k-1 background, the rest foreground
    bg_right = torch.cat([torch.zeros(1, device=gap.device), torch.cumsum(1 - is_fg, 0)])
    fg_right = is_fg.sum() - torch.cat([torch.zeros(1, device=gap.device), torch.cumsum(is_fg, 0)])
    agree = bg_right + fg_right
    k = int(torch.argmax(agree))
    finite = torch.isfinite(gap)
    lo = gap[k - 1] if k > 0 else gap[finite].min() - 1.0
    hi = gap[k] if k < len(gap) else gap[finite].max() + 1.0
    b = float((lo + hi) / 2)
    model.add_background_bias(b)
    return b, float(agree[k] / len(gap))


class SelfTrainingTarget:
    """The stage-2 target of a batch (:func:`smaf.losses.self_training_target`) under the section's rules.

    * ``target_bg``: ``rule`` = each image's background score of its whole fused map under the inference rule
      (``soft_bg`` of the batch: the partition of the target is then the stage-1 masks'), ``fixed`` =
      ``bg_score`` for every image (the reference).
    * ``denoise`` with ``denoise_rule``: ``softmax`` = ProDA-style weights over the labelled classes and the
      background (:func:`smaf.losses.softmax_prototype_weights`, temperature ``denoise_temperature``: a number,
      or ``auto`` = :func:`smaf.losses.scale_matched_temperature` measured once on the first batch), applied to
      every channel; ``reference`` = ReLU(cos) on the foreground only (the reference's commented-out code).
    """

    def __init__(self, sect, num_classes: int, target_size: int):
        from ..config import ConfigError

        self.num_classes, self.size = num_classes, target_size
        self.align_corners = bool(sect.get("align_corners", False))
        self.ignore_padding = bool(sect.get("ignore_padding", False))
        self.target_bg, self.bg_score = str(sect.get("target_bg", "fixed")), float(sect.bg_score)
        self.denoise, self.rule = bool(sect.denoise), str(sect.get("denoise_rule", "reference"))
        if self.target_bg not in TARGET_BG:
            raise ConfigError(f"train_fusion.target_bg={self.target_bg!r}: expected one of {', '.join(TARGET_BG)}")
        if self.rule not in DENOISE_RULES:
            raise ConfigError(f"train_fusion.denoise_rule={self.rule!r}: expected one of {', '.join(DENOISE_RULES)}")
        temperature = str(sect.get("denoise_temperature", "auto"))
        try:
            self.temperature = None if temperature == "auto" else float(temperature)
        except ValueError:
            raise ConfigError(f"train_fusion.denoise_temperature={temperature!r}: expected a number or auto") from None
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"train_fusion.denoise_temperature={temperature}: must be > 0")

    @property
    def needs_teacher(self) -> bool:
        return self.denoise

    def background(self, batch: dict, device):
        if self.target_bg == "fixed":
            return self.bg_score
        if "soft_bg" not in batch:
            raise ValueError("train_fusion.target_bg=rule needs the dataset's soft_bg (soft_bg_rule)")
        return batch["soft_bg"].to(device, non_blocking=True)

    def __call__(self, batch: dict, labels, device, teacher_feature=None, prototypes=None) -> torch.Tensor:
        """(B, C+1, size, size) target; ``teacher_feature`` (B, D, h, w) of the whole images and ``prototypes``
        (C+1, D) when denoising."""
        fused = F.interpolate(batch["soft"].to(device, non_blocking=True), size=(self.size, self.size),
                              mode="bilinear", align_corners=self.align_corners)
        bg = self.background(batch, device)
        weights = bg_weight = None
        if self.denoise and self.rule == "reference":
            w_full = prototype_weights(teacher_feature, prototypes[:self.num_classes])
            weights = crop_weights(w_full, batch["params"], self.size)
        elif self.denoise:
            similarity = prototype_similarity(teacher_feature, prototypes)
            if self.temperature is None:
                self.temperature = scale_matched_temperature(similarity, labels)
            w = crop_weights(softmax_prototype_weights(similarity, labels, self.temperature), batch["params"],
                             self.size, padding_mode="border")
            weights, bg_weight = w[:, :self.num_classes], w[:, self.num_classes:]
        return self_training_target(fused, labels, bg, weights, bg_weight)

    def valid(self, batch: dict, device) -> torch.Tensor | None:
        """(B, size, size) fraction of image pixels (not crop padding) under each target pixel, or None when
        padding counts as background (``ignore_padding: false``, the reference)."""
        if not self.ignore_padding:
            return None
        return F.adaptive_avg_pool2d(batch["valid"].to(device, non_blocking=True)[:, None], self.size)[:, 0]


def make_step(student, teacher, bank: PrototypeBank, target: SelfTrainingTarget, loss_weight: float, ema: float,
              device, saliency_weight: float = 0.0, eps_tau: float = 0.4, eps_lam: float = 0.5):
    """The stage-2 step and its after-step update, for :func:`smaf.engine.train_loop`.

    ``step(model, batch, iteration) -> (loss, logs)``: when denoising, the teacher's forward pass on the whole
    image (no gradient) gives the features for the weights and the class means for the prototypes; then the
    target (:class:`SelfTrainingTarget`) and the student's loss. ``after_step(iteration)``: EMA update of the
    teacher from ``student`` and, when denoising, the prototype update from the teacher's class means of the
    step (summed over ranks). Without denoising the prototypes are unused, so neither is computed."""
    pending = {}

    def step(model, batch, iteration):
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        with torch.no_grad():
            f_t = None
            if target.needs_teacher:
                _, cam_t, f_t = teacher(batch["full"].to(device, non_blocking=True))
                pending["stats"] = bank.batch_class_means(cam_t, f_t, labels)
            goal = target(batch, labels, device, f_t, bank.prototypes)
        _, cam_s, _ = model(images)
        loss = self_training_loss(cam_s, goal, loss_weight, target.align_corners, target.valid(batch, device))
        if saliency_weight and "saliency" in batch:
            loss_sal, _ = eps_saliency_loss(cam_s, batch["saliency"].to(device, non_blocking=True), labels,
                                            tau=eps_tau, lam=eps_lam)
            return loss + saliency_weight * loss_sal, {"st": float(loss.detach()), "sal": float(loss_sal.detach())}
        return loss, {}

    def after_step(iteration):
        ema_update(teacher, student, ema)
        if "stats" in pending:
            sums, counts = pending.pop("stats")
            bank.update(dist.all_reduce_sum(sums), dist.all_reduce_sum(counts))

    return step, after_step


def build_self_training(student, sect, target: SelfTrainingTarget, prototypes: torch.Tensor, min_pixels: int,
                        device):
    """What stage 2 trains with, from the student (on ``device``, with its background channel and bias) and the
    ``train_fusion`` section: ``(teacher, bank, step, after_step)``; the teacher is a frozen copy of the student,
    the bank holds ``prototypes`` (C+1, D). Also used by the speed benchmark."""
    teacher = copy.deepcopy(student).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    bank = PrototypeBank(prototypes.to(device), sect.proto_momentum, min_pixels)
    step, after_step = make_step(student, teacher, bank, target, sect.loss_weight, sect.ema, device,
                                 float(sect.get("saliency_weight", 0.0)))
    return teacher, bank, step, after_step


def collapse_guard(max_drop: float):
    """``guard(start, now) -> message or None`` for :func:`smaf.engine.train_loop`: a message when the validation
    mIoU fell more than ``max_drop`` points below its value before training (0 disables the guard)."""

    def guard(start: dict, now: dict):
        if not max_drop or "val_miou" not in start or "val_miou" not in now:
            return None
        drop = start["val_miou"] - now["val_miou"]
        if drop <= max_drop:
            return None
        return (f"self-training collapsed: validation mIoU fell from {start['val_miou']:.2f} to {now['val_miou']:.2f} "
                f"(more than train_fusion.collapse_drop={max_drop:g} points); stopped. Check train_fusion.target_bg, "
                f"train_fusion.bg_bias and the learning rate")

    return guard


def run(cfg):
    """Stage 2. Returns the path of ``final.pth`` (the student)."""
    sect = cfg.train_fusion
    # every input is checked before anything is written
    check_training_section(sect, "train_fusion")
    rule = BackgroundRule.from_section(cfg.inference, "inference")
    layout = VOCLayout.from_config(cfg)
    num_classes = layout.num_classes
    ids = layout.read_list(pick(sect.train_list, cfg.data.train_list))
    check_inputs(layout, ids, "train_fusion.train_list")
    if sect.val_every:
        CAMValidator.check_config_inputs(cfg, layout, sect.val_max_images)
    check_resume_checkpoint(sect, "train_fusion", layout, head="smaf")
    runs = RunLayout(cfg)
    fusion_dir = runs.input("train_fusion", "fusion_dir")
    proto_path = fusion_dir / PROTOTYPES
    if not proto_path.is_file():
        raise StageError(f"'{proto_path}' not found: run {runs.producer('train_fusion', 'fusion_dir')} first")
    protos = load_prototypes(proto_path)
    set_seed(cfg.seed)   # before the model is built: a new background row draws from the RNG
    ckpt = runs.input("train_fusion", "checkpoint")
    student, _ = load_model(ckpt, producer=runs.producer("train_fusion", "checkpoint"), device="cpu",
                            num_classes=num_classes, key="train_fusion.checkpoint", layout=layout)
    if tuple(protos["prototypes"].shape) != (num_classes + 1, student.feat_dim):
        raise StageError(f"'{proto_path}' holds prototypes of shape {tuple(protos['prototypes'].shape)} but the "
                         f"model needs ({num_classes + 1}, {student.feat_dim}): re-run "
                         f"{runs.producer('train_fusion', 'fusion_dir')}")
    transform = JointTrainTransform(sect.crop, sect.resize_long, flip=True, jitter=None)
    with_saliency = float(sect.get("saliency_weight", 0.0)) > 0
    if with_saliency:
        check_inputs(layout, ids, "train_fusion.train_list", saliency=True)
    dataset = ClassificationDataset(layout, ids, transform, soft_dir=fusion_dir / CAM_NPY, full_size=sect.crop,
                                    soft_bg_rule=rule if sect.target_bg == "rule" else None, saliency=with_saliency)
    out_dir, logger, device, layout = prepare_output(cfg, "train_fusion", layout=layout)
    # the student is validated like stage 3 will use it: single-scale, with the inference section's rule
    validator = CAMValidator.from_config(cfg, layout, sect.val_max_images, logger)
    student = student.to(device)
    calib = collate_train([dataset[(i, int(cfg.seed) + i)] for i in range(min(len(dataset), sect.batch_size))])
    if student.has_background and sect.get("calibration", "weights") == "scale_all":
        # a classifier with a background channel (eps) whose softmax is saturated: the same fixed temperature
        divisor = calibrate_logit_scale(student.eval(), calib["full"].to(device), calib["labels"].to(device))
        logger.info("logits divided by the mean peak CAM %.2f (a fixed scale) so the softmax starts unsaturated",
                    divisor)
    if not student.has_background:
        student.add_background_channel()
        divisor = calibrate_background_head(student.eval(), calib["full"].to(device), calib["labels"].to(device),
                                            "weights" if sect.get("calibration", "weights") == "weights" else "scale")
        logger.info("stage-0 model is a plain CAM classifier: added a background channel (zero-initialised) and "
                    "divided the %s by the mean peak CAM %.2f so the softmax starts unsaturated",
                    "logits (a fixed scale)" if sect.get("calibration", "weights") == "scale" else "class rows", divisor)
    target = SelfTrainingTarget(sect, num_classes, sect.crop // sect.target_stride)
    labels = calib["labels"].to(device)
    with torch.no_grad():   # the first batch's target (the teacher starts as a copy of the student)
        f_0 = student.eval()(calib["full"].to(device))[2] if target.needs_teacher else None
        calib_target = target(calib, labels, device, f_0, protos["prototypes"].to(device))
    if sect.bg_bias:
        bias, agreement = fit_background_bias(student.eval(), calib["image"].to(device), labels, calib_target,
                                              target.align_corners, target.valid(calib, device))
        logger.info("background bias %.3f: the initial student puts %.1f%% of the first batch's pixels on the "
                    "target's side of foreground/background", bias, 100 * agreement)
    teacher, bank, step, after_step = build_self_training(student, sect, target, protos["prototypes"],
                                                          protos["min_pixels"], device)
    if target.denoise and target.rule == "softmax":
        logger.info("denoising: softmax prototype weights over the labelled classes and the background, "
                    "temperature %.3f%s", target.temperature, " (scale-matched)" if
                    str(sect.denoise_temperature) == "auto" else "")
    size = target.size
    logger.info("stage 2: %d images, fused maps from %s, denoise %s, target %dx%d, target background %s",
                len(ids), fusion_dir, f"{sect.denoise} ({target.rule})" if sect.denoise else False, size, size,
                f"per image ({rule})" if target.target_bg == "rule" else f"{sect.bg_score:.2f}")
    return train_loop(cfg, sect, out_dir, logger, device, student, dataset, step,
                      lambda total: build_optimizer(sect, student.param_groups(), total, "train_fusion"),
                      validator=validator, extras={"teacher": ModuleState(teacher), "prototypes": bank},
                      after_step=after_step, final_extras=lambda: {FINAL_TEACHER: teacher},
                      guard=collapse_guard(float(sect.collapse_drop)))


def main(argv=None):
    stage_main(run, "Stage 2: self-training with fused multi-scale attention maps.", argv)


if __name__ == "__main__":
    main()
