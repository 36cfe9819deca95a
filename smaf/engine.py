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

Interrupted runs resume exactly (docs/faults.md): training checkpoints are read weights-only and checked
against the model; ``metrics.jsonl`` is cut back to the resumed iteration (no repeated rows); the half-full
logging window travels in the checkpoint; a validation owed at the resumed iteration is run; a stage is
finished when ``final.pth`` and its ``final_extras`` files exist. ``ckpt_every``/``val_every`` 0 mean never.

The model must carry an ``arch_spec`` (models built through :mod:`smaf.models.registry` do): it is what the
checkpoints record, so a later stage rebuilds the network from the file alone.
"""
from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import dist
from .amp import autocast_context
from .checkpoint import (TRAINING_KEYS, CheckpointError, check_state_fits, latest_training_checkpoint,
                         read_checkpoint, save_checkpoint)
from .data.sampler import IterationBatchSampler
from .data.voc import collate_train
from .io import atomic_save
from .run_layout import CHECKPOINTS, FINAL, METRICS_FILE, WARNINGS_FILE
from .runtime import StageError, check_positive, default_workers

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


def section_name(cfg, sect) -> str:
    """The key of ``cfg`` whose value is the section ``sect`` (``train_cls``...), for messages."""
    return next((k for k, v in cfg.items() if v is sect), "train")


def check_training_section(sect, section: str) -> None:
    """ConfigError naming the key for a training length, batch or period that cannot work: ``iterations``,
    ``batch_size`` and ``log_every`` must be >= 1; ``ckpt_every`` and ``val_every`` >= 0 (0 = never); the
    global ``batch_size`` must split evenly over the processes (the process group's size, or torchrun's
    ``WORLD_SIZE`` before the group exists); ``crop`` and ``resize_long``, where the section has them, must be
    a positive side and an inclusive [lo, hi] range of long sides. Checked here so that no output folder is
    made for a run that cannot start (a bad range would otherwise fail inside a loader worker)."""
    from .config import ConfigError
    from .data.transforms import crop_side, long_side_range

    check_positive(sect, section, ("iterations", "batch_size", "log_every"), ("ckpt_every", "val_every"))
    if "crop" in sect:
        crop_side(sect.crop, f"{section}.crop")
    if "resize_long" in sect:
        long_side_range(sect.resize_long, f"{section}.resize_long")
    world = dist.world_size() if dist.is_distributed() else int(os.environ.get("WORLD_SIZE", "1") or 1)
    if "batch_size" in sect and int(sect.batch_size) % world:
        raise ConfigError(f"{section}.batch_size={int(sect.batch_size)}: the global batch must be divisible by the "
                          f"{world} processes; set {section}.batch_size to a multiple of {world}")


def check_resume_checkpoint(sect, section: str, layout, head: str | None = None) -> None:
    """Check an explicit ``<section>.resume=<path>`` before the stage writes anything: a readable smaf
    checkpoint (weights-only) of a network for the dataset's classes (and, when given, with head ``head``).
    ``auto`` / ``none`` are left to :func:`train_loop`."""
    from .checkpoint import check_num_classes, checked_spec

    resume = str(sect.get("resume", "auto"))
    if resume in ("auto", "none", ""):
        return
    ckpt = read_checkpoint(resume, producer=f"the stage ({section}.resume names one of its checkpoints/iter_*.pth)")
    spec = checked_spec(ckpt["meta"], resume)
    check_num_classes(spec, layout.num_classes, resume, f"{section}.resume", layout)
    found = spec.get("args", {}).get("head")
    if head is not None and found is not None and found != head:
        raise CheckpointError(f"{section}.resume='{resume}' is a model with head {found} but this run trains head "
                              f"{head}: resume with the settings it was trained with, or {section}.resume=none")


def read_metrics(metrics_file: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (a line cut short by a kill is skipped)."""
    rows = []
    if metrics_file.is_file():
        for line in metrics_file.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def _truncate_metrics(metrics_file: Path, start: int) -> list[dict]:
    """Drop the rows an interrupted run wrote after the iteration it resumes from (all rows when it starts
    from scratch), so that a resumed run's ``metrics.jsonl`` equals an uninterrupted run's. Returns the rows
    kept."""
    if not metrics_file.is_file():
        return []
    rows = read_metrics(metrics_file)
    kept = [r for r in rows if isinstance(r.get("iteration"), int)
            and (r["iteration"] < start or (start > 0 and r["iteration"] == start))]
    text = "".join(json.dumps(r) + "\n" for r in kept)
    if text != metrics_file.read_text():
        atomic_save(metrics_file, lambda tmp: Path(tmp).write_text(text))
    return kept


def train_loop(cfg, sect, out_dir: Path, logger, device: torch.device, model, dataset, step_fn, make_optimizer,
               validator=None, extras: dict | None = None, after_step=None, final_extras=None, guard=None) -> Path:
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
        guard: ``guard(metrics before training, metrics now) -> message or None``: with a guard the model is also
            validated before the first step (logged as iteration 0); a message stops training at that validation
            (warning in the log, ``warnings.json`` in ``out_dir``; ``final.pth`` is the model at that point).
    """
    section = section_name(cfg, sect)
    check_training_section(sect, section)
    extras = extras or {}
    final_path = out_dir / FINAL
    ckpt_dir = out_dir / CHECKPOINTS
    resume = str(sect.resume)
    if final_path.is_file() and resume == "auto":
        # finished = final.pth AND the extra final files (written first; a run killed between them finishes)
        absent = [name for name in (final_extras() if final_extras else {}) if not (out_dir / name).is_file()]
        if not absent:
            logger.info("%s exists: training already finished (resume=none to train again)", final_path)
            return final_path
        logger.info("%s exists but %s does not: the run was interrupted while writing its final files; "
                    "finishing it", final_path, ", ".join(absent))
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
    window = {"count": 0, "sums": {}}
    if ckpt_path is not None:
        ckpt = _read_training_checkpoint(ckpt_path, section, ckpt_dir, model, optimizer, scaler, extras, total,
                                         explicit=resume != "auto")
        start, rng_states = int(ckpt["iteration"]), ckpt["rng"]
        window = ckpt.get("log_window") or window
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
    kept_rows = _truncate_metrics(metrics_file, start) if dist.is_main() else []
    dist.barrier()
    logger.info("training %d -> %d iterations | global batch %d | %d images | %d loader workers | amp %s",
                start, total, sect.batch_size, len(dataset), workers, amp)
    if not sect.ckpt_every:
        logger.info("%s.ckpt_every=0: no intermediate checkpoints (an interrupted run starts again)", section)
    model.train()
    bar = tqdm(total=total, initial=start, desc=out_dir.name, disable=not dist.is_main(), dynamic_ncols=True)
    t0, done_here = time.perf_counter(), 0
    running, counted = dict(window["sums"]), int(window["count"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = _starting_metrics(validator, model, start, logger, metrics_file) if guard and validator else {}
    stopped = None
    if start > 0 and validator is not None and sect.val_every and start % sect.val_every == 0:
        # killed between the checkpoint of iteration `start` and its validation: validate now (the model is the
        # checkpoint's; validation uses no global RNG), so the run records what an uninterrupted one does
        pending = [not any(r.get("iteration") == start and "loss" not in r for r in kept_rows)]
        if dist.is_distributed():
            torch.distributed.broadcast_object_list(pending, src=0)
        if pending[0]:
            stopped = _validate(validator, model, start, logger, metrics_file, guard, baseline)
    it = start
    for t in range(start, start if stopped else total):
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
        counted += 1
        bar.update(1)
        if it % sect.log_every == 0 or it == total:
            avg = {k: v / max(counted, 1) for k, v in running.items()}
            running, counted = {}, 0
        if dist.is_main() and (it % sect.log_every == 0 or it == total):
            rate = done_here / (time.perf_counter() - t0)
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{avg['loss']:.4f}", lr=f"{lr:.2e}")
            detail = " ".join(f"{k} {v:.4f}" for k, v in avg.items() if k != "loss")
            logger.info("iter %d/%d loss %.4f %s| lr %.3e | %.2f it/s | eta %s", it, total, avg["loss"],
                        detail + " " if detail else "", lr, rate, _format_eta((total - it) / max(rate, 1e-9)))
            with open(metrics_file, "a") as fh:
                fh.write(json.dumps({"iteration": it, "lr": lr, **avg}) + "\n")
        if sect.ckpt_every and it % sect.ckpt_every == 0 and it < total:
            _save_training_checkpoint(ckpt_dir, it, model, optimizer, scaler, extras, device,
                                      {"count": counted, "sums": dict(running)})
        if validator is not None and sect.val_every and it % sect.val_every == 0 and it < total:
            stopped = _validate(validator, model, it, logger, metrics_file, guard, baseline)
            if stopped:
                break
    bar.close()
    if device.type == "cuda":
        logger.info("peak GPU memory %.2f GiB", torch.cuda.max_memory_allocated(device) / 2 ** 30)
    if validator is not None and sect.val_every and start < total and not stopped:
        stopped = _validate(validator, model, total, logger, metrics_file, guard, baseline)
    if stopped and dist.is_main():
        (out_dir / WARNINGS_FILE).write_text(json.dumps({"stopped_at": it, "warning": stopped}, indent=2))
    if dist.is_main():
        for name, module in (final_extras() if final_extras else {}).items():
            save_checkpoint(out_dir / name, module, iteration=total)
        save_checkpoint(final_path, model, iteration=total)
        logger.info("saved %s", final_path)
    dist.barrier()
    return final_path


def _validate(validator, model, it, logger, metrics_file, guard=None, baseline=None):
    """Validate (rank 0), log and record the metrics; returns the guard's message (all ranks), or None."""
    message = [None]
    if dist.is_main():
        metrics = validator(model) or {}
        if metrics:
            what = getattr(validator, "description", "")
            logger.info("iter %d: validation %s%s", it, ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()),
                        f" ({what})" if what else "")
            with open(metrics_file, "a") as fh:
                fh.write(json.dumps({"iteration": it, **metrics}) + "\n")
            if guard is not None and baseline:
                message[0] = guard(baseline, metrics)
                if message[0]:
                    logger.warning("%s", message[0])
    if dist.is_distributed():
        torch.distributed.broadcast_object_list(message, src=0)
    dist.barrier()
    return message[0]


def _starting_metrics(validator, model, start: int, logger, metrics_file: Path) -> dict:
    """The validation before training (iteration 0): measured when training starts, read back on resume."""
    if start == 0:
        _validate(validator, model, 0, logger, metrics_file)
    rows = read_metrics(metrics_file)
    return next(({k: v for k, v in r.items() if k != "iteration"} for r in rows if r.get("iteration") == 0
                 and "loss" not in r), {})


def _read_training_checkpoint(path: Path, section: str, ckpt_dir: Path, model, optimizer, scaler, extras: dict,
                              total: int, explicit: bool = True) -> dict:
    """Read a training checkpoint and restore model, optimiser, scaler and extras from it; anything that does
    not fit is a one-line :class:`~smaf.checkpoint.CheckpointError` naming the file and the fix."""
    ckpt = read_checkpoint(path, producer="this stage")
    which = f"{section}.resume='{path}'" if explicit else f"checkpoint '{path}' (found by {section}.resume=auto)"
    fix = (f"resume from one of {ckpt_dir}/iter_*.pth ({section}.resume=auto), train from the start "
           f"({section}.resume=none)" + ("" if explicit else f", or delete {path}"))
    missing = [k for k in TRAINING_KEYS if k not in ckpt] + [f"extras.{n}" for n in extras
                                                            if n not in (ckpt.get("extras") or {})]
    if missing:
        raise CheckpointError(f"{which} is not a training checkpoint of this stage (it has no "
                              f"{', '.join(missing)}): {fix}")
    check_state_fits(model, ckpt["model"], path, what=f"{section} resume checkpoint")
    start = int(ckpt["iteration"])
    if not 0 <= start < total:
        raise CheckpointError(f"{which} is at iteration {start} but {section}.iterations={total}: "
                              f"raise {section}.iterations or {fix}")
    try:
        model.load_state_dict(ckpt["model"], strict=True)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        for name, obj in extras.items():
            obj.load_state_dict(ckpt["extras"][name])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{which} does not fit this run's {section} settings "
                              f"({' '.join(str(err).split())[:200]}): resume with the settings it was trained "
                              f"with, or {fix}") from None
    return ckpt


def _save_training_checkpoint(ckpt_dir, it, model, optimizer, scaler, extras, device, log_window=None):
    states = [None] * dist.world_size()
    if dist.is_distributed():
        torch.distributed.all_gather_object(states, _rng_state(device))
    else:
        states = [_rng_state(device)]
    if dist.is_main():
        save_checkpoint(ckpt_dir / f"iter_{it:07d}.pth", model, iteration=it,
                        optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                        extras={k: v.state_dict() for k, v in extras.items()}, rng=states,
                        log_window=log_window or {"count": 0, "sums": {}})
        found = sorted((int(m.group(1)), p) for p in ckpt_dir.glob("iter_*.pth")
                       if (m := re.fullmatch(r"iter_(\d+)\.pth", p.name)))
        # checkpoints past this iteration are an earlier run's (resume=none, or resume=<path> of an older one):
        # removed, or they would outlive this run's and resume=auto would continue the other run
        old = [p for n, p in found if n <= it][:-KEEP_CHECKPOINTS] + [p for n, p in found if n > it]
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
