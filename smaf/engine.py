"""The explicit, task-neutral training loop of every training stage (detectron2-style: everything visible here).

It owns: AMP (CUDA; bf16 on CPU), DDP under torchrun, deterministic resumable batches
(:class:`~smaf.data.sampler.IterationBatchSampler`), checkpoints with model + optimiser + scaler + RNG
states + stage extras, ``resume=auto``, a guard against non-finite losses, periodic validation, a progress
bar, a readable log and ``metrics.jsonl``.

A stage supplies what is its own:

* ``step_fn(model, batch, iteration) -> (loss, {name: float})``: the forward pass and loss of its task;
* ``make_optimizer(max_step) -> optimizer``: usually :func:`smaf.optim.build_optimizer` over the model's
  parameter groups (the config's ``optimizer`` key picks poly SGD or AdamW with warm-up);
* ``validator``: any callable ``model -> {metric: value}`` (e.g. :class:`smaf.cam.validate.CAMValidator`);
* optional extras (objects with ``state_dict``/``load_state_dict``, e.g. the EMA teacher), ``after_step``.

The model must carry an ``arch_spec`` (models built through :mod:`smaf.models.registry` do): it is what the
checkpoints record, so a later stage rebuilds the network from the file alone.
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
from .amp import autocast_context
from .checkpoint import latest_training_checkpoint, read_checkpoint, save_checkpoint
from .data.sampler import IterationBatchSampler
from .data.voc import collate_train
from .run_layout import CHECKPOINTS, FINAL, METRICS_FILE
from .runtime import StageError, default_workers

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


def optimisation_step(optimizer, scaler, loss, after_step, iteration: int) -> None:
    """Backward (through the AMP grad scaler), optimiser step, then ``after_step(iteration)`` if given."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    if after_step is not None:
        after_step(iteration)


def train_loop(cfg, sect, out_dir: Path, logger, device: torch.device, model, dataset, step_fn, make_optimizer,
               validator=None, extras: dict | None = None, after_step=None, final_extras=None) -> Path:
    """Train ``model`` for ``sect.iterations`` iterations; returns the path of ``<out_dir>/final.pth``.

    Args:
        cfg: the resolved config (``amp``, ``seed``, ``num_workers``).
        sect: the stage's config section (batch_size, iterations, ckpt_every, val_every, log_every, resume).
        model: the network (with ``arch_spec``), on ``device``; dataset: items for
            :func:`~smaf.data.voc.collate_train`, keyed by ``(index, seed)``.
        step_fn: ``(model_or_ddp, batch, iteration) -> (loss tensor, logs dict)``.
        make_optimizer: ``max_step -> optimizer`` (the optimiser's schedule runs over ``max_step`` steps).
        validator: ``model -> {metric: value}`` ({} when there is nothing to validate), run every
            ``sect.val_every`` iterations and at the end; None disables validation.
        extras: ``{name: object with state_dict/load_state_dict}`` saved in training checkpoints.
        after_step: ``f(iteration)`` called after each optimiser step (EMA updates...).
        final_extras: ``f() -> {filename: module}`` extra final files (e.g. the EMA teacher), written
            before ``final.pth`` (whose presence marks the stage finished).
    """
    extras = extras or {}
    final_path = out_dir / FINAL
    ckpt_dir = out_dir / CHECKPOINTS
    resume = str(sect.resume)
    if final_path.is_file() and resume == "auto":
        logger.info("%s exists: training already finished (resume=none to train again)", final_path)
        return final_path
    world, rank = dist.world_size(), dist.rank()
    total = int(sect.iterations)
    optimizer = make_optimizer(total)
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

    metrics_file = out_dir / METRICS_FILE
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
            _save_training_checkpoint(ckpt_dir, it, model, optimizer, scaler, extras, device)
        if validator is not None and sect.val_every and it % sect.val_every == 0 and it < total:
            _validate(validator, model, it, logger, metrics_file)
    bar.close()
    if device.type == "cuda":
        logger.info("peak GPU memory %.2f GiB", torch.cuda.max_memory_allocated(device) / 2 ** 30)
    if validator is not None and sect.val_every and start < total:
        _validate(validator, model, total, logger, metrics_file)
    if dist.is_main():
        for name, module in (final_extras() if final_extras else {}).items():
            save_checkpoint(out_dir / name, module, iteration=total)
        save_checkpoint(final_path, model, iteration=total)
        logger.info("saved %s", final_path)
    dist.barrier()
    return final_path


def _validate(validator, model, it, logger, metrics_file):
    if dist.is_main():
        metrics = validator(model) or {}
        if metrics:
            what = getattr(validator, "description", "")
            logger.info("iter %d: validation %s%s", it, ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()),
                        f" ({what})" if what else "")
            with open(metrics_file, "a") as fh:
                fh.write(json.dumps({"iteration": it, **metrics}) + "\n")
    dist.barrier()


def _save_training_checkpoint(ckpt_dir, it, model, optimizer, scaler, extras, device):
    states = [None] * dist.world_size()
    if dist.is_distributed():
        torch.distributed.all_gather_object(states, _rng_state(device))
    else:
        states = [_rng_state(device)]
    if dist.is_main():
        save_checkpoint(ckpt_dir / f"iter_{it:07d}.pth", model, iteration=it,
                        optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                        extras={k: v.state_dict() for k, v in extras.items()}, rng=states)
        old = sorted(ckpt_dir.glob("iter_*.pth"))[:-KEEP_CHECKPOINTS]
        for p in old:
            p.unlink(missing_ok=True)
    dist.barrier()


class ModuleState:
    """Adapter so a module (an EMA teacher) is saved and restored with the training checkpoints (an extra)."""

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
