"""Checkpoints of this project: ``{'format': 'smaf', 'model': state_dict, 'meta': {...}, ...}``.

``meta`` is the model's architecture spec ``{'arch': registered name, 'args': constructor arguments}``
(:mod:`smaf.models.registry`), so later stages rebuild any registered network without repeating the model
settings. Checkpoints of earlier smaf versions hold the CAM network's fields directly (``backbone``, ``head``,
``num_classes``, ``output_stride``, ``feat_dim``); :func:`architecture_spec` reads both. Training checkpoints
add the optimiser, iteration, RNG states and stage extras (EMA teacher, prototypes) for exact resume.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .io import atomic_save
from .runtime import SmafError

FORMAT = "smaf"


_LEGACY_CAM_NET_KEYS = ("backbone", "head", "num_classes", "output_stride", "feat_dim")


class CheckpointError(SmafError, RuntimeError):
    """A checkpoint is missing or unusable; the message names the file and the stage that writes it."""


def architecture_spec(meta: dict) -> dict:
    """``{'arch', 'args'}`` of a checkpoint's meta, also for checkpoints of earlier versions (CAM network
    fields at the top level)."""
    if "arch" in meta:
        return {"arch": meta["arch"], "args": dict(meta.get("args", {}))}
    return {"arch": "cam_net", "args": {k: meta[k] for k in _LEGACY_CAM_NET_KEYS}}


def describe(meta: dict) -> str:
    """One line for logs: ``cam_net(backbone=efficientnet_lite0, head=smaf, ...)``."""
    spec = architecture_spec(meta)
    return f"{spec['arch']}(" + ", ".join(f"{k}={v}" for k, v in spec["args"].items()) + ")"


def save_checkpoint(path: str | os.PathLike, model, meta: dict | None = None, **extra) -> Path:
    """Atomically write ``{'format': 'smaf', 'model': state_dict, 'meta': meta, **extra}``; ``meta`` defaults to
    the model's ``arch_spec`` (set by :func:`smaf.models.registry.build_from_spec`)."""
    module = getattr(model, "module", model)
    if meta is None:
        meta = getattr(module, "arch_spec", None)
        if meta is None:
            raise ValueError("save_checkpoint: the model has no arch_spec (build it with smaf.models.build_model or "
                             "build_from_spec), so pass meta explicitly")
    payload = {"format": FORMAT, "model": module.state_dict(), "meta": meta, **extra}
    return atomic_save(path, lambda tmp: torch.save(payload, tmp))


def read_checkpoint(path: str | os.PathLike, producer: str = "") -> dict:
    """Load one of our checkpoints (CPU tensors). ``producer`` names the stage that writes it, for the error."""
    path = Path(path)
    if not path.is_file():
        hint = f"; run {producer} first" if producer else ""
        raise CheckpointError(f"checkpoint '{path}' not found{hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - truncated/corrupt files raise many types
        raise CheckpointError(f"checkpoint '{path}' is unreadable ({err.__class__.__name__}); delete it and re-run "
                              f"{producer or 'the stage that wrote it'}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or "meta" not in ckpt:
        raise CheckpointError(f"'{path}' is not a smaf checkpoint; use model.pretrained for foreign weights")
    return ckpt


def load_model(path: str | os.PathLike, producer: str = "", device: str | torch.device = "cpu"):
    """Rebuild the network stored in a smaf checkpoint (any registered architecture) and load its weights
    strictly. Returns (model, architecture spec ``{'arch', 'args'}``)."""
    from .models.registry import build_from_spec

    ckpt = read_checkpoint(path, producer)
    spec = architecture_spec(ckpt["meta"])
    model = build_from_spec(spec)
    model.load_state_dict(ckpt["model"], strict=True)
    return model.to(device), spec


_ITER_RE = re.compile(r"iter_(\d+)\.pth$")


def latest_training_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The ``iter_<n>.pth`` with the largest n in ``ckpt_dir``, or None."""
    found = []
    for p in Path(ckpt_dir).glob("iter_*.pth"):
        m = _ITER_RE.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None
