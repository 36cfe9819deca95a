"""The explicit training loop shared by stage 0 and stage 2 (detectron2-style: everything visible here).

It owns: the poly SGD optimiser, AMP (CUDA), DDP under torchrun, deterministic resumable batches
(:class:`~smaf.data.sampler.IterationBatchSampler`), checkpoints with model + optimiser + scaler + RNG
states + stage extras, ``resume=auto``, a guard against non-finite losses, periodic validation mIoU,
a progress bar, a readable log and ``metrics.jsonl``.

A stage supplies ``step_fn(model, batch, iteration) -> (loss, {name: float})`` and optional extras
(objects with ``state_dict``/``load_state_dict``, e.g. the EMA teacher) and ``after_step(iteration)``.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import dist
from .cam import autocast_context, fuse_image, label_from_maps
from .checkpoint import latest_training_checkpoint, read_checkpoint, save_checkpoint
from .data.sampler import IterationBatchSampler
from .data.voc import InferenceDataset, collate_single, collate_train
from .optim import build_poly_sgd
from .stages.common import StageError, default_workers

KEEP_CHECKPOINTS = 2


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Validator:
    """Single-scale CAM mIoU on a list with masks (background score per image from ``bg_rule``, a
    :class:`smaf.cam.BackgroundRule`).

    ``__call__(model) -> mIoU`` (percent) or None when the list has no masks (noted once in the log)."""

    def __init__(self, cfg, layout, list_path: str, max_images: int, bg_rule, device, logger):
        from .data.voc import DatasetError

        self.layout, self.device, self.logger, self.bg_rule = layout, device, logger, bg_rule
        self.workers = min(2, default_workers(cfg.num_workers))
        self.amp, self.base_long = cfg.amp, cfg.fusion.base_long
        try:
            ids = layout.read_list(list_path) if list_path else []
        except DatasetError as err:
            logger.info("validation disabled: %s", err)
            ids = []
        if max_images and len(ids) > max_images:
            ids = ids[:max_images]
        self.ids = ids if ids and layout.has_masks(ids) else []
        if ids and not self.ids:
            logger.info("validation skipped: the validation list '%s' has no ground-truth masks", list_path)

    @torch.no_grad()
    def __call__(self, model) -> float | None:
        from .metrics import confusion_matrix, scores

        if not self.ids:
            return None
        was_training = model.training
        model.eval()
        conf = 0
        dataset = InferenceDataset(self.layout, self.ids, scales=(1.0,), base_long=self.base_long)
        loader = DataLoader(dataset, batch_size=1, num_workers=self.workers, collate_fn=collate_single,
                            generator=torch.Generator())  # never consume the global RNG (exact resume)
        for sample in loader:
            result = fuse_image(model, sample["scaled"], sample["labels"], sample["image"].shape[:2], flip=False,
                                amp=self.amp)
            pred = label_from_maps(result, self.bg_rule(result.maps)).cpu().numpy()
            conf = conf + confusion_matrix(pred, self.layout.load_mask(sample["id"]), self.layout.num_classes)
        model.train(was_training)
        return scores(conf, ["background"] + self.layout.class_names)["miou"]


def optimisation_step(optimizer, scaler, loss, after_step, iteration: int) -> None:
    """Backward (through the AMP grad scaler), optimiser step, then ``after_step(iteration)`` if given."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    if after_step is not None:
        after_step(iteration)


def train_loop(cfg, sect, out_dir: Path, logger, device: torch.device, model, dataset, step_fn, meta: dict,
               extras: dict | None = None, after_step=None, validator: Validator | None = None,
               final_extras=None) -> Path:
    """Train ``model`` for ``sect.iterations`` iterations; returns the path of ``<out_dir>/final.pth``.

    Args:
        sect: the stage's config section (batch_size, lr, weight_decay, momentum, iterations, ckpt_every,
            val_every, log_every, resume).
        step_fn: ``(model_or_ddp, batch, iteration) -> (loss tensor, logs dict)``.
        meta: model rebuild info stored in every checkpoint (:func:`smaf.checkpoint.model_meta`).
        extras: ``{name: object with state_dict/load_state_dict}`` saved in training checkpoints.
        after_step: ``f(iteration)`` called after each optimiser step (EMA updates...).
        final_extras: ``f() -> {filename: (module, meta)}`` extra final files (e.g. the EMA teacher).
    """
    extras = extras or {}
    final_path = out_dir / "final.pth"
    ckpt_dir = out_dir / "checkpoints"
    resume = str(sect.resume)
    if final_path.is_file() and resume == "auto":
        logger.info("%s exists: training already finished (resume=none to train again)", final_path)
        return final_path
    world, rank = dist.world_size(), dist.rank()
    total = int(sect.iterations)
    optimizer = build_poly_sgd(model.param_groups(), lr=sect.lr, weight_decay=sect.weight_decay,
                               momentum=sect.momentum, max_step=total)
    amp = cfg.amp if device.type == "cuda" else "none"
    if cfg.amp not in ("none", "", None) and device.type != "cuda":
        logger.info("amp=%s ignored on CPU: training in fp32", cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=(amp == "fp16"))

    start, rng_states = 0, None
    ckpt_path = None
    if resume == "auto":
        ckpt_path = latest_training_checkpoint(ckpt_dir)
    elif resume not in ("none", ""):
        ckpt_path = Path(resume)
    if ckpt_path is not None:
        ckpt = read_checkpoint(ckpt_path, producer="this stage")
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        for name, obj in extras.items():
            obj.load_state_dict(ckpt["extras"][name])
        start, rng_states = int(ckpt["iteration"]), ckpt["rng"]
        logger.info("resumed from %s at iteration %d", ckpt_path, start)

    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    sampler = IterationBatchSampler(len(dataset), int(sect.batch_size), int(cfg.seed), start, total, rank, world)
    workers = default_workers(cfg.num_workers)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_train,
                        pin_memory=device.type == "cuda", generator=torch.Generator(),
                        prefetch_factor=2 if workers else None, persistent_workers=False)
    batches = iter(loader)
    if rng_states is not None:
        _set_rng_state(rng_states[rank] if len(rng_states) == world else rng_states[0], device)

    metrics_file = out_dir / "metrics.jsonl"
    logger.info("training %d -> %d iterations | global batch %d | %d images | %d loader workers | amp %s",
                start, total, sect.batch_size, len(dataset), workers, amp)
    model.train()
    bar = tqdm(total=total, initial=start, desc=out_dir.name, disable=not dist.is_main(), dynamic_ncols=True)
    t0, done_here, running = time.perf_counter(), 0, {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for t in range(start, total):
        batch = next(batches)
        with autocast_context(device, amp):
            loss, logs = step_fn(net, batch, t)
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=device)
        if dist.all_reduce_sum(bad).item() > 0:
            raise StageError(f"non-finite loss at iteration {t + 1} (images {', '.join(batch['id'])}): lower the "
                             f"learning rate, use amp=none, or check these images")
        optimisation_step(optimizer, scaler, loss, after_step, t)
        it, done_here = t + 1, done_here + 1
        logs = {"loss": float(loss.detach()), **logs}
        for key, value in logs.items():
            running[key] = running.get(key, 0.0) + value
        bar.update(1)
        if dist.is_main() and (it % sect.log_every == 0 or it == total):
            n = it % sect.log_every or sect.log_every
            avg = {k: v / n for k, v in running.items()}
            running = {}
            rate = done_here / (time.perf_counter() - t0)
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{avg['loss']:.4f}", lr=f"{lr:.2e}")
            detail = " ".join(f"{k} {v:.4f}" for k, v in avg.items() if k != "loss")
            logger.info("iter %d/%d loss %.4f %s| lr %.3e | %.2f it/s | eta %s", it, total, avg["loss"],
                        detail + " " if detail else "", lr, rate, _format_eta((total - it) / max(rate, 1e-9)))
            with open(metrics_file, "a") as fh:
                fh.write(json.dumps({"iteration": it, "lr": lr, **avg}) + "\n")
        if it % sect.ckpt_every == 0 and it < total:
            _save_training_checkpoint(ckpt_dir, it, model, meta, optimizer, scaler, extras, device)
        if validator is not None and sect.val_every and it % sect.val_every == 0 and it < total:
            _validate(validator, model, it, logger, metrics_file)
    bar.close()
    if device.type == "cuda":
        logger.info("peak GPU memory %.2f GiB", torch.cuda.max_memory_allocated(device) / 2 ** 30)
    if validator is not None and sect.val_every and start < total:
        _validate(validator, model, total, logger, metrics_file)
    if dist.is_main():
        save_checkpoint(final_path, model, meta, iteration=total)
        for name, (module, module_meta) in (final_extras() if final_extras else {}).items():
            save_checkpoint(out_dir / name, module, module_meta, iteration=total)
        logger.info("saved %s", final_path)
    dist.barrier()
    return final_path


def _validate(validator, model, it, logger, metrics_file):
    if dist.is_main():
        miou = validator(model)
        if miou is not None:
            logger.info("iter %d: validation single-scale CAM mIoU %.2f (%d images)", it, miou, len(validator.ids))
            with open(metrics_file, "a") as fh:
                fh.write(json.dumps({"iteration": it, "val_miou": miou}) + "\n")
    dist.barrier()


def _save_training_checkpoint(ckpt_dir, it, model, meta, optimizer, scaler, extras, device):
    states = [None] * dist.world_size()
    if dist.is_distributed():
        torch.distributed.all_gather_object(states, _rng_state(device))
    else:
        states = [_rng_state(device)]
    if dist.is_main():
        save_checkpoint(ckpt_dir / f"iter_{it:07d}.pth", model, meta, iteration=it,
                        optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                        extras={k: v.state_dict() for k, v in extras.items()}, rng=states)
        old = sorted(ckpt_dir.glob("iter_*.pth"))[:-KEEP_CHECKPOINTS]
        for p in old:
            p.unlink(missing_ok=True)
    dist.barrier()
