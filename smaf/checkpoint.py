"""Checkpoints of this project: ``{'format': 'smaf', 'model': state_dict, 'meta': {...}, ...}``.

``meta`` is the model's architecture spec ``{'arch': registered name, 'args': constructor arguments}``
(:mod:`smaf.models.registry`), so later stages rebuild any registered network without repeating the model
settings. Checkpoints of earlier smaf versions hold the CAM network's fields directly (``backbone``, ``head``,
``num_classes``, ``output_stride``, ``feat_dim``); :func:`architecture_spec` reads both. Training checkpoints
add the optimiser, iteration, RNG states and stage extras (EMA teacher, prototypes) for exact resume.

Checkpoints are user-supplied files (``fusion.checkpoint``, ``*.resume=<path>`` ...), so they are read with
``torch.load(weights_only=True)`` (:func:`smaf.safe_load.torch_load`: tensors, plain containers and exactly the
numpy globals of the RNG state); a file that needs anything else is refused with one line. Every problem of a
checkpoint (missing, unreadable, refused, incomplete ``meta``, another architecture or class count) is a
:class:`CheckpointError` naming the file and the fix.

:func:`load_model` also takes a checkpoint of the reference implementations (PSA / SEAM / EPS / SMAF: a bare
state dict or ``{'Net': {'model_state': ...}}``, ``module.`` prefixes allowed; flat ResNet-38 keys + head), e.g.
the EPS classifier the SMAF authors ship as stage 0's output. It has no ``meta``: the architecture is inferred
from its keys (backbone resnet38d, head and class count from ``fc8``; :func:`smaf.models.weights.map_reference_head`),
said in one printed line, and the whole network must load (strictly, backbone and head).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .io import atomic_save
from .runtime import SmafError
from .safe_load import UnreadableFileError, UnsafeFileError, torch_load

FORMAT = "smaf"


_LEGACY_CAM_NET_KEYS = ("backbone", "head", "num_classes", "output_stride", "feat_dim")
#: What a training checkpoint (``checkpoints/iter_*.pth``) holds besides ``format``, ``model`` and ``meta``.
TRAINING_KEYS = ("iteration", "optimizer", "scaler", "rng")


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


def _load_file(path: Path, producer: str = ""):
    """The object in ``path``, read safely (weights-only), or a one-line :class:`CheckpointError`."""
    if not path.is_file():
        hint = f"; run {producer} first" if producer else ""
        raise CheckpointError(f"checkpoint '{path}' not found{hint}")
    try:
        return torch_load(path, "checkpoint")
    except UnsafeFileError as err:
        raise CheckpointError(str(err)) from None
    except (UnreadableFileError, OSError) as err:
        raise CheckpointError(f"checkpoint '{path}' is unreadable ({_reason(err)}); delete it and re-run "
                              f"{producer or 'the stage that wrote it'}") from None


def _is_smaf(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT and "meta" in obj


def read_checkpoint(path: str | os.PathLike, producer: str = "") -> dict:
    """Load one of our checkpoints (CPU tensors), safely (weights-only). ``producer`` names the stage that
    writes it, for the error. Checks the format, the ``model`` state dict and ``meta`` (see
    :func:`checked_spec`); any problem is a one-line :class:`CheckpointError`."""
    path = Path(path)
    return _checked_smaf(_load_file(path, producer), path, producer)


def _checked_smaf(ckpt, path: Path, producer: str = "") -> dict:
    rerun = producer or "the stage that wrote it"
    if not _is_smaf(ckpt):
        raise CheckpointError(f"'{path}' is not a smaf checkpoint; use model.pretrained for foreign weights")
    model = ckpt.get("model")
    if not isinstance(model, dict) or not model or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise CheckpointError(f"checkpoint '{path}' has no 'model' state dict of tensors; delete it and re-run "
                              f"{rerun}")
    checked_spec(ckpt["meta"], path, producer)
    return ckpt


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    found = text.rsplit("unreadable (", 1)
    return found[1].rstrip(")") if len(found) == 2 else (text[:160] or err.__class__.__name__)


def checked_spec(meta, path: str | os.PathLike = "", producer: str = "") -> dict:
    """:func:`architecture_spec` of a checkpoint's ``meta``, or a :class:`CheckpointError` saying what is
    missing (``{'arch': str, 'args': dict}``, or all of the legacy fields)."""
    rerun = producer or "the stage that wrote it"
    where = f"checkpoint '{path}'" if path else "checkpoint"
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} has a 'meta' of type {type(meta).__name__}, expected a dict "
                              f"{{'arch', 'args'}}; re-create it with {rerun}")
    if "arch" in meta:
        if not isinstance(meta["arch"], str) or not isinstance(meta.get("args", {}), dict):
            raise CheckpointError(f"{where} has a malformed meta (arch {meta['arch']!r}, args of type "
                                  f"{type(meta.get('args')).__name__}); re-create it with {rerun}")
        return architecture_spec(meta)
    missing = [k for k in _LEGACY_CAM_NET_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{where} lacks the architecture in its meta (no 'arch'; missing "
                              f"{', '.join(missing)}): it cannot be rebuilt; re-create it with {rerun}")
    return architecture_spec(meta)


def spec_num_classes(spec: dict) -> int | None:
    """The number of foreground classes an architecture spec was built for (None when it does not say)."""
    value = spec.get("args", {}).get("num_classes")
    return None if value is None else int(value)


def check_num_classes(spec: dict, num_classes: int, path: str | os.PathLike, key: str = "",
                      layout=None) -> None:
    """A :class:`CheckpointError` when the checkpoint ``path`` (architecture ``spec``) was trained for another
    number of classes than the dataset's ``num_classes`` (``key`` = the config key that named the file)."""
    found = spec_num_classes(spec)
    if found is None or found == int(num_classes):
        return
    names = ""
    if layout is not None:
        source = layout.names_path
        names = f" (class names from {source if source.is_file() else 'the 20 VOC defaults'})"
    which = f"{key}='{path}'" if key else f"checkpoint '{path}'"
    raise CheckpointError(f"{which} was trained for {found} classes but the dataset has {num_classes}{names}: "
                          f"give a checkpoint trained on this dataset, or fix data.labels_txt / data.cls_labels")


def check_state_fits(module, state: dict, path: str | os.PathLike, what: str = "checkpoint") -> None:
    """A :class:`CheckpointError` (one line, first keys named) unless ``state`` loads strictly into ``module``."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs model {list(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for name, items in (("shape-mismatched", shapes), ("missing", missing), ("unexpected", unexpected)):
        if items:
            parts.append(f"{name} {len(items)} (e.g. {', '.join(items[:2])})")
    raise CheckpointError(f"{what} '{path}' does not fit the model ({'; '.join(parts)}): it was made for another "
                          f"architecture or number of classes")


def load_model(path: str | os.PathLike, producer: str = "", device: str | torch.device = "cpu",
               num_classes: int | None = None, key: str = "", layout=None):
    """Rebuild the network stored in a smaf checkpoint (any registered architecture) and load its weights
    strictly. With ``num_classes`` the checkpoint's class count is checked first (``key``: the config key that
    named the file, for the message). Returns (model, architecture spec ``{'arch', 'args'}``)."""
    from .models.registry import build_from_spec

    path = Path(path)
    obj = _load_file(path, producer)
    if not _is_smaf(obj):
        reference = _reference_state(obj)
        if reference is not None:
            return _load_reference_model(path, reference, producer, device, num_classes, key, layout)
    if not _is_smaf(obj):
        raise CheckpointError(f"'{path}' is neither a smaf checkpoint nor a reference-layout classifier (flat "
                              f"ResNet-38 keys + fc8, as PSA/SEAM/EPS/SMAF write them); use model.pretrained for "
                              f"other foreign weights")
    ckpt = _checked_smaf(obj, path, producer)
    spec = checked_spec(ckpt["meta"], path, producer)
    if num_classes is not None:
        check_num_classes(spec, num_classes, path, key, layout)
    try:
        model = build_from_spec(spec)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"checkpoint '{path}' records an architecture this version cannot build "
                              f"({spec['arch']}: {' '.join(str(err).split())[:200]}); re-create it with "
                              f"{producer or 'the stage that wrote it'}") from None
    check_state_fits(model, ckpt["model"], path)
    model.load_state_dict(ckpt["model"], strict=True)
    return model.to(device), spec


def _reference_state(obj) -> dict | None:
    """The flat state dict of a reference-layout checkpoint (``module.`` stripped), or None."""
    from .models.weights import (
        find_state_dict,
        is_reference_layout,
        strip_data_parallel_prefix,
    )

    if not isinstance(obj, dict) or obj.get("format") == FORMAT:
        return None
    state = find_state_dict(obj)
    if state is None:
        return None
    state = strip_data_parallel_prefix(state)
    return state if is_reference_layout(state) else None


def _load_reference_model(path: Path, state: dict, producer: str, device, num_classes: int | None, key: str,
                          layout):
    """A CAMNet (backbone resnet38d) built from the architecture a reference-layout checkpoint implies, with all
    of its weights loaded strictly. Says in one printed line what was inferred."""
    from .models.registry import build_from_spec
    from .models.weights import WeightsError, map_reference_head

    which = f"{key}='{path}'" if key else f"checkpoint '{path}'"
    try:
        mapped = map_reference_head(state, path, num_classes=num_classes)
    except WeightsError as err:
        raise CheckpointError(f"{key}: {err}" if key else str(err)) from None
    spec = {"arch": "cam_net", "args": {"num_classes": mapped.num_classes, "backbone": "resnet38d",
                                        "output_stride": 8, "feat_dim": mapped.feat_dim, "head": mapped.head}}
    if num_classes is not None:
        check_num_classes(spec, num_classes, path, key, layout)
    model = build_from_spec(spec)
    weights = dict(mapped.state)
    for name, value in model.state_dict().items():   # BN step counters: absent from converted files, unused
        if name.endswith("num_batches_tracked") and name not in weights:
            weights[name] = value
    check_state_fits(model, weights, path, what=f"reference-layout checkpoint ({mapped.layout} layout)")
    model.load_state_dict(weights, strict=True)
    tensors = sum(not k.endswith("num_batches_tracked") for k in weights)
    print(f"{which} is a reference-layout checkpoint (no smaf meta): inferred {describe(spec)} from its keys; "
          f"loaded all {tensors} tensors; {mapped.describe()}", flush=True)
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
