"""Reading and loading weights in the layouts users have.

:func:`read_state_dict` turns a file into a flat ``{key: tensor}``:

* MXNet ``.params`` (the ResNet-38 ImageNet weights): read and converted on the fly (:mod:`smaf.models.convert`);
* ``.pth`` / ``.pt``: a plain state dict; a ``module.``-prefixed one (DataParallel / DDP); a nested one
  (``{'state_dict': ...}``, ``{'model': ...}``, ``{'net': ...}``, ``{'model_state': ...}``,
  ``{'Net': {'model_state': ...}}``, ...: the first mapping of tensors found, preferred keys first); PSA / SEAM /
  EPS / SMAF-reference checkpoints (flat ResNet38d keys plus head keys such as ``fc8.weight``); our own checkpoints
  ``{'format': 'smaf', 'model': state_dict, ...}``.

:func:`load_weights` loads such a file into a module, aligning key prefixes (``backbone.`` is stripped when
loading a whole-model checkpoint into a backbone, and added when loading backbone weights into a whole model), and
prints one summary line. Our own checkpoints load strictly.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from smaf.runtime import SmafError

SMAF_FORMAT = "smaf"
IMAGENET_PARAMS = "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
DEFAULT_IMAGENET_PTH = "weights/resnet38d_imagenet.pth"
BACKBONE_PREFIX = "backbone."
DATA_PARALLEL_PREFIX = "module."
# Keys tried first when a checkpoint nests its state dict (training scripts of the PSA lineage and others).
PREFERRED_NESTED_KEYS = ("state_dict", "model_state", "model_state_dict", "model", "net", "Net", "network",
                         "module", "params", "weights")
_EXAMPLES = 3


class WeightsError(SmafError, RuntimeError):
    """A weights file is missing, unreadable or does not fit the model; the message is one line saying which file
    and what to do."""


def imagenet_weights_hint(path: str | os.PathLike) -> str:
    """The one-line 'where to get it' message for missing ResNet-38 ImageNet weights at ``path``."""
    target = path if Path(path).suffix in (".pth", ".pt") else DEFAULT_IMAGENET_PTH
    return (f"ResNet-38 ImageNet weights not found at {path}: download {IMAGENET_PARAMS} (itijyou/ademxapp model "
            f"zoo) and convert it with: python -m smaf.models.convert {IMAGENET_PARAMS} {target}")


def _looks_like_imagenet_weights(path: Path, module: nn.Module | None) -> bool:
    from smaf.models.resnet38d import ResNet38d

    name = path.name.lower()
    return (isinstance(module, ResNet38d) or path.suffix == ".params"
            or any(word in name for word in ("resnet38", "imagenet", "ilsvrc")))


def _missing_file_error(path: Path, module: nn.Module | None = None) -> WeightsError:
    if _looks_like_imagenet_weights(path, module):
        return WeightsError(imagenet_weights_hint(path))
    return WeightsError(f"weights file not found at {path}: give an existing .pth/.pt checkpoint (or the MXNet "
                        f"{IMAGENET_PARAMS}, converted with python -m smaf.models.convert)")


def _is_tensor_mapping(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def find_state_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """The first mapping ``{str: Tensor}`` in a (nested) checkpoint object: ``obj`` itself, else its values under
    :data:`PREFERRED_NESTED_KEYS` in that order, else its other mapping values in order (depth first)."""
    if _is_tensor_mapping(obj):
        return dict(obj)
    if not isinstance(obj, Mapping):
        return None
    preferred = [k for k in PREFERRED_NESTED_KEYS if k in obj]
    others = [k for k in obj if k not in PREFERRED_NESTED_KEYS]
    for key in preferred + others:
        found = find_state_dict(obj[key])
        if found is not None:
            return found
    return None


def strip_data_parallel_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` that DataParallel / DDP put before every key (only when every key has it)."""
    if state and all(k.startswith(DATA_PARALLEL_PREFIX) for k in state):
        return {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in state.items()}
    return dict(state)


def _unreadable(path: Path, err: Exception) -> WeightsError:
    reason = str(err).splitlines()[0] if str(err) else "corrupt"
    return WeightsError(f"cannot read weights file {path} ({err.__class__.__name__}: {reason}); "
                        "re-download or re-create it")


def _torch_load(path: Path) -> Any:
    """torch.load on CPU: the safe tensors-only unpickler first; full unpickling only for checkpoints that
    need it (e.g. numpy scalars or custom objects in their extra entries)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # refused by the restricted unpickler (or corrupt: the full load below will say so)
    except Exception as err:  # noqa: BLE001 - truncated/corrupt files raise many types
        raise _unreadable(path, err) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001
        raise _unreadable(path, err) from None


def _read_checkpoint(path: str | os.PathLike, module: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """(flat state dict with ``module.`` stripped, format) where format is 'smaf', 'mxnet' or 'torch'."""
    path = Path(path)
    if not path.is_file():
        raise _missing_file_error(path, module)
    if path.suffix == ".params":
        from smaf.models.convert import mxnet_to_resnet38d
        from smaf.models.mxnet_params import read_mxnet_params
        try:
            return mxnet_to_resnet38d(read_mxnet_params(path)), "mxnet"
        except ValueError as err:
            raise WeightsError(str(err).splitlines()[0]) from None
    obj = _torch_load(path)
    is_smaf = isinstance(obj, Mapping) and obj.get("format") == SMAF_FORMAT
    if is_smaf:
        state = obj.get("model")
        if not _is_tensor_mapping(state):
            raise WeightsError(f"{path} is a smaf checkpoint without a 'model' state dict")
        state = dict(state)
    else:
        state = find_state_dict(obj)
        if state is None:
            kind = f"dict with keys {', '.join(map(str, list(obj)[:8]))}" if isinstance(obj, Mapping) \
                else type(obj).__name__
            raise WeightsError(f"no state dict (mapping of names to tensors) found in {path}: it holds a {kind}")
    return strip_data_parallel_prefix(state), SMAF_FORMAT if is_smaf else "torch"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``path`` (.params, .pth, .pt in any layout listed in the module docstring) -> flat ``{key: CPU tensor}``
    with ``module.`` removed. A missing or unreadable file raises WeightsError (one line)."""
    return _read_checkpoint(path)[0]


def _align_keys(state: dict[str, torch.Tensor], model_keys: set[str], prefix: str
                ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map checkpoint keys onto the module's: (aligned state, ignored checkpoint keys).

    With ``prefix``: keep the keys under it, stripped. Then pick the best of: keys as they are; the
    ``backbone.`` part only, stripped (a whole-model checkpoint into a backbone); ``backbone.`` added (backbone
    weights into a whole model): the one matching most module keys, ties going to the keys as they are."""
    ignored: list[str] = []
    if prefix:
        ignored = [k for k in state if not k.startswith(prefix)]
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    candidates = [(state, [])]
    if any(k.startswith(BACKBONE_PREFIX) for k in state):
        candidates.append(({k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)},
                           [k for k in state if not k.startswith(BACKBONE_PREFIX)]))
    if any(k.startswith(BACKBONE_PREFIX) for k in model_keys):
        candidates.append(({BACKBONE_PREFIX + k: v for k, v in state.items()}, []))
    best_state, best_ignored = max(candidates, key=lambda c: sum(k in model_keys for k in c[0]))
    return best_state, ignored + best_ignored


def _examples(items) -> str:
    if not items:
        return ""
    shown = []
    for item in items[:_EXAMPLES]:
        if isinstance(item, tuple):  # (key, checkpoint shape, model shape)
            shown.append(f"{item[0]} {list(item[1])} vs model {list(item[2])}")
        else:
            shown.append(item)
    more = ", ..." if len(items) > _EXAMPLES else ""
    return f" (e.g. {', '.join(shown)}{more})"


def load_weights(module: nn.Module, path: str | os.PathLike, strict: bool = False, prefix: str = "") -> dict:
    """Load the weights file ``path`` into ``module`` and print one summary line.

    Args:
        module: e.g. a ResNet38d (backbone) or a whole CAMNet (keys ``backbone.*`` + head).
        path: .params / .pth / .pt in any layout of :func:`read_state_dict`.
        strict: raise WeightsError (listing keys) if anything is missing, unexpected or of the wrong shape;
            nothing is loaded then. Our own checkpoints (``'format': 'smaf'``) are always loaded strictly.
        prefix: load only the checkpoint keys under this prefix, with the prefix removed (e.g. ``'backbone.'``);
            '' = all keys, with ``backbone.`` stripped or added automatically when that matches the module.

    Returns a report: ``{'path', 'format' ('smaf'|'torch'|'mxnet'), 'loaded' (keys), 'total' (module tensors
    that can be loaded), 'missing', 'unexpected', 'shape_mismatched' ([(key, checkpoint shape, module shape)]),
    'ignored' (checkpoint keys outside the selected prefix), 'summary' (the printed line)}``. BN
    ``num_batches_tracked`` counters count neither as tensors nor as missing (a frozen BN does not use them).
    Tensors of other dtypes are cast to the module's dtype by ``load_state_dict``.
    """
    path = Path(path)
    state, file_format = _read_checkpoint(path, module)
    strict = strict or file_format == SMAF_FORMAT
    expected = module.state_dict()
    state, ignored = _align_keys(state, set(expected), prefix)

    def countable(key: str) -> bool:
        return not key.endswith("num_batches_tracked")

    missing = [k for k in expected if k not in state and countable(k)]
    unexpected = [k for k in state if k not in expected]
    shape_mismatched = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
                        if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    mismatched_keys = {k for k, _, _ in shape_mismatched}
    loadable = {k: v for k, v in state.items() if k in expected and k not in mismatched_keys}
    loaded = [k for k in loadable if countable(k)]
    total = sum(countable(k) for k in expected)

    detail = (f"missing {len(missing)}{_examples(missing)}; unexpected {len(unexpected)}{_examples(unexpected)}; "
              f"shape-mismatched {len(shape_mismatched)}{_examples(shape_mismatched)}")
    if ignored:
        detail += f"; ignored {len(ignored)} outside '{prefix or BACKBONE_PREFIX}'{_examples(ignored)}"
    if strict and (missing or unexpected or shape_mismatched):
        why = "smaf checkpoints load strictly" if file_format == SMAF_FORMAT else "strict loading"
        raise WeightsError(f"weights in {path} do not fit {type(module).__name__} ({why}): {detail}")

    # Loading a fresh dict copy: load_state_dict fills absent BN counters into the dict it is given.
    module.load_state_dict(dict(loadable), strict=False)
    summary = f"loaded {len(loaded)}/{total} tensors from {path}; {detail}"
    print(summary, flush=True)
    return {"path": str(path), "format": file_format, "loaded": loaded, "total": total, "missing": missing,
            "unexpected": unexpected, "shape_mismatched": shape_mismatched, "ignored": ignored,
            "summary": summary}
