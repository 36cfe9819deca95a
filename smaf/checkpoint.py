"""Checkpoints of this project: ``{'format': 'smaf', 'model': state_dict, 'meta': {...}, ...}``.

``meta`` records how to rebuild the network (backbone, head, number of classes, output stride, feature
size), so later stages load a checkpoint without repeating the model settings. Training checkpoints
add the optimiser, iteration, RNG states and stage extras (EMA teacher, prototypes) for exact resume.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .io import atomic_save

FORMAT = "smaf"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unusable; the message names the file and the stage that writes it."""


def model_meta(model, backbone: str, output_stride: int) -> dict:
    """Rebuild information for a CAMNet."""
    return {"backbone": backbone, "head": "smaf" if model.has_background else "cls",
            "num_classes": model.num_classes, "output_stride": output_stride,
            "feat_dim": getattr(model, "feat_dim", 128)}


def save_checkpoint(path: str | os.PathLike, model, meta: dict, **extra) -> Path:
    """Atomically write ``{'format': 'smaf', 'model': state_dict, 'meta': meta, **extra}``."""
    module = getattr(model, "module", model)
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
    """Rebuild the CAMNet stored in a smaf checkpoint and load its weights strictly. Returns (model, meta)."""
    from .config import Config
    from .models import build_model

    ckpt = read_checkpoint(path, producer)
    meta = ckpt["meta"]
    model = build_model(Config({"backbone": meta["backbone"], "pretrained": "", "output_stride": meta["output_stride"],
                         "feat_dim": meta["feat_dim"], "head": meta["head"]}), meta["num_classes"])
    model.load_state_dict(ckpt["model"], strict=True)
    return model.to(device), meta


_ITER_RE = re.compile(r"iter_(\d+)\.pth$")


def latest_training_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The ``iter_<n>.pth`` with the largest n in ``ckpt_dir``, or None."""
    found = []
    for p in Path(ckpt_dir).glob("iter_*.pth"):
        m = _ITER_RE.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None
