"""Stage 2: self-training with fused maps (``bash script/train_fusion.sh``).

Student and EMA teacher start from the stage-0 model (a plain ``cam`` classifier gets a fresh background
channel: the target trains it). Each training image comes with its fused map M from stage 1, resized,
flipped and cropped together with the image; the teacher sees the whole image resized to the crop size.

Target at 1/``target_stride`` of the crop: T = [M y (x w); bg] / max over channels (reactivation), where
the optional denoising weights w_k = ReLU(cos(f_teacher, prototype_k)) are computed on the teacher's
whole-image features and mapped into the crop with the transform parameters. Loss = loss_weight x
MSE(softmax(student cam), T). After each step the teacher is an EMA of the student and the prototypes
move towards the teacher's class-mean features (momentum ``proto_momentum``).

Outputs in ``<work_dir>/<train_fusion.out_subdir>/``: ``final.pth`` (student, used by stage 3), ``final_teacher.pth``
(EMA teacher), ``checkpoints/``, ``log.txt``, ``metrics.jsonl``, ``config.yaml``.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import dist
from ..cam import BackgroundRule
from ..checkpoint import load_model
from ..data.transforms import JointTrainTransform, crop_to_image_grid
from ..data.voc import ClassificationDataset, collate_train
from ..engine import Validator, train_loop
from ..losses import prototype_weights, self_training_loss, self_training_target
from .common import StageError, pick, prepare_output, set_seed


class PrototypeBank:
    """(C+1, D) class prototypes (background last) with a momentum update from teacher outputs."""

    def __init__(self, prototypes: torch.Tensor, momentum: float, min_pixels: int = 10):
        self.prototypes = prototypes.float().clone()
        self.momentum, self.min_pixels = momentum, min_pixels

    def state_dict(self) -> dict:
        return {"prototypes": self.prototypes.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.prototypes = state["prototypes"].to(self.prototypes.device)

    @torch.no_grad()
    def batch_class_means(self, cam: torch.Tensor, feature: torch.Tensor, labels: torch.Tensor):
        """Sum over images of each image's mean feature per assigned class, and the image counts.

        cam: (B, C+1, h, w) teacher CAM; feature: (B, D, h, w); labels: (B, C). A pixel is assigned to
        argmax over [softmax fg x labels; softmax bg]; classes with < min_pixels pixels in an image are
        skipped. Returns (sums (C+1, D), counts (C+1,))."""
        b, k, h, w = cam.shape
        p = torch.softmax(cam.float(), 1)
        scores = torch.cat([p[:, :-1] * labels[:, :, None, None], p[:, -1:]], 1)
        onehot = F.one_hot(scores.argmax(1), k).permute(0, 3, 1, 2).float()           # (B, K, h, w)
        pixels = onehot.sum((2, 3))                                                   # (B, K)
        means = torch.einsum("bkhw,bdhw->bkd", onehot, feature.float()) / pixels.clamp(min=1)[..., None]
        keep = (pixels >= self.min_pixels).float()
        return (means * keep[..., None]).sum(0), keep.sum(0)

    @torch.no_grad()
    def update(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """prototype_k <- (1 - m) prototype_k + m mean_k for classes seen in the (global) batch."""
        seen = counts > 0
        batch_mean = sums[seen] / counts[seen, None]
        self.prototypes[seen] = (1 - self.momentum) * self.prototypes[seen] + self.momentum * batch_mean


class ModuleState:
    """Adapter so the EMA teacher is saved/restored with the training checkpoints."""

    def __init__(self, module):
        self.module = module

    def state_dict(self):
        return self.module.state_dict()

    def load_state_dict(self, state):
        self.module.load_state_dict(state, strict=True)


@torch.no_grad()
def ema_update(teacher, student, decay: float) -> None:
    """teacher params <- decay teacher + (1 - decay) student; buffers copied from the student."""
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(decay).add_(ps.detach(), alpha=1 - decay)
    for bt, bs in zip(teacher.buffers(), student.buffers()):
        bt.copy_(bs)


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
    """The stage-2 step and its after-step update, for :func:`smaf.engine.train_loop` (also used by
    :mod:`smaf.bench`).

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


def run(cfg):
    """Stage 2. Returns the path of ``final.pth`` (the student)."""
    sect = cfg.train_fusion
    out_dir, logger, device, layout = prepare_output(cfg, sect.out_subdir, "train_fusion")
    # the student is validated like stage 3 will use it: single-scale here, with stage 3's background rule
    # (read first: a bad rule fails before any model is loaded)
    val_rule = BackgroundRule.from_section(cfg.pseudo_masks, "pseudo_masks")
    set_seed(cfg.seed)
    num_classes = layout.num_classes
    ids = layout.read_list(pick(sect.train_list, cfg.data.train_list))
    fusion_dir = Path(pick(sect.fusion_dir, str(Path(cfg.work_dir) / cfg.fusion.out_subdir)))
    proto_path = fusion_dir / "prototypes.pt"
    if not proto_path.is_file():
        raise StageError(f"'{proto_path}' not found: run stage 1 (bash script/gen_fusion.sh) first")
    ckpt = pick(sect.checkpoint, str(Path(cfg.work_dir) / "train_cls" / "final.pth"))
    student, meta = load_model(ckpt, producer="stage 0 (bash script/train_cls.sh)", device="cpu")
    if student.num_classes != num_classes:
        raise StageError(f"{ckpt} was trained for {student.num_classes} classes but the dataset has {num_classes}")
    transform = JointTrainTransform(sect.crop, sect.resize_long, flip=True, jitter=None)
    dataset = ClassificationDataset(layout, ids, transform, soft_dir=fusion_dir / "cam_npy", full_size=sect.crop)
    student = student.to(device)
    if not student.has_background:
        student.add_background_channel()
        meta = dict(meta, head="smaf")
        calib = collate_train([dataset[(i, int(cfg.seed) + i)] for i in range(min(len(dataset), sect.batch_size))])
        divisor = calibrate_background_head(student.eval(), calib["full"].to(device), calib["labels"].to(device))
        logger.info("stage-0 model is a plain CAM classifier: added a background channel (zero-initialised) and "
                    "divided the class rows by the mean peak CAM %.2f so the softmax starts unsaturated", divisor)
    teacher = copy.deepcopy(student).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    bank = PrototypeBank(torch.load(proto_path, map_location="cpu")["prototypes"].to(device),
                         sect.proto_momentum, cfg.fusion.prototype_min_pixels)
    target_size = sect.crop // sect.target_stride
    step, after_step = make_step(student, teacher, bank, num_classes, target_size, sect.bg_score, sect.loss_weight,
                                 sect.denoise, sect.ema, device)

    validator = Validator(cfg, layout, cfg.data.val_list, sect.val_max_images, val_rule, device, logger)
    logger.info("stage 2: %d images, fused maps from %s, denoise %s, target %dx%d, target background score %.2f",
                len(ids), fusion_dir, sect.denoise, target_size, target_size, sect.bg_score)
    return train_loop(cfg, sect, out_dir, logger, device, student, dataset, step, meta,
                      extras={"teacher": ModuleState(teacher), "prototypes": bank}, after_step=after_step,
                      validator=validator, final_extras=lambda: {"final_teacher.pth": (teacher, meta)})


def main(argv=None):
    from .common import stage_main

    stage_main(run, "Stage 2: self-training with fused multi-scale attention maps.", argv)


if __name__ == "__main__":
    main()
