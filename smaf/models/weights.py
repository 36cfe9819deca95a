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

Checkpoints of the reference implementations (PSA, SEAM, EPS, SMAF: flat ResNet-38 keys ``conv1a.*``, ``b2.*`` ...
``bn7.*`` plus their head) load into a whole :class:`~smaf.models.cam_net.CAMNet` through
:func:`map_reference_head`, the one mapping of their head keys onto ours:

* SMAF reference head ``cov_feat`` (1x1 conv D->F) -> ``feature_conv``, ``bn`` -> ``feature_bn``, ``fc8``
  (1x1 conv F->K) -> ``classifier``. K = C+1 with the background last, as ours (EPS layout); K = C for a plain
  classifier (head ``cls``).
* A classifier ``fc8`` directly on conv6 (PSA: K = C; EPS: K = C+1, background last; SEAM: K = C+1, background
  FIRST, recognised by its pixel-correlation keys ``f8_3``/``f8_4``/``f9``): embedded exactly into our head,
  ``feature_conv`` = [fc8; -fc8; 0], ``feature_bn`` = identity, ``classifier`` = [I, -I, 0], so the CAM is
  fc8(conv6) (ReLU(z) - ReLU(-z) = z; needs feat_dim >= 2K). The feature f is then [ReLU(z); ReLU(-z); 0], not a
  learned embedding.
* SEAM's pixel-correlation module (``f8_3``, ``f8_4``, ``f9``) and the contrast projections (``fc_proj``,
  ``proj_fc``) are not part of a CAM head: dropped, and listed in the summary line (the CAM is fc8's raw output,
  not SEAM's PCM-refined ``cam_rv``).

Strictly: a head that cannot be mapped (unknown keys, wrong shapes, a class count that fits neither C nor C+1,
an incomplete SMAF head) is a :class:`WeightsError` naming the file, the keys and the fix, never a random head.
A backbone-only file (ImageNet, or any file given to a backbone as ``model.pretrained``) loads as before.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


# ------------------------------------------------------------- reference layouts (PSA / SEAM / EPS / SMAF)
#: The keys of ResNet38d (flat, as in the reference checkpoints): conv1a, b2 .. b7 (with _k), bn7.
RESNET38D_KEY = re.compile(r"^(?:conv1a|bn7|b[2-7](?:_\d+)?)\.")
#: Reference head key -> CAMNet key (the SMAF reference network: cov_feat -> bn -> ReLU -> fc8).
REFERENCE_HEAD_KEYS = {"cov_feat.weight": "feature_conv.weight", "bn.weight": "feature_bn.weight",
                       "bn.bias": "feature_bn.bias", "bn.running_mean": "feature_bn.running_mean",
                       "bn.running_var": "feature_bn.running_var",
                       "bn.num_batches_tracked": "feature_bn.num_batches_tracked", "fc8.weight": "classifier.weight"}
_SMAF_HEAD_REQUIRED = ("cov_feat.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var")
#: SEAM / PPC pixel-correlation module and contrast projections: not a CAM head, dropped (listed).
REFERENCE_DROPPED_PREFIXES = ("f8_3.", "f8_4.", "f9.", "fc_proj.", "proj_fc.")
_SEAM_PCM_PREFIXES = ("f8_3.", "f8_4.", "f9.")
DEFAULT_FEAT_DIM = 128
_REFERENCE_FIX = ("give it as model.pretrained to use its backbone only (stage 0 then trains a new head), or "
                  "rename its head keys as smaf.models.weights.REFERENCE_HEAD_KEYS lists")


def is_reference_layout(state: Mapping[str, torch.Tensor]) -> bool:
    """True for a flat state dict of the PSA lineage: ResNet-38 keys without ``backbone.`` plus head keys."""
    return (any(RESNET38D_KEY.match(k) for k in state) and not any(k.startswith(BACKBONE_PREFIX) for k in state)
            and any(not RESNET38D_KEY.match(k) for k in state))


@dataclass
class ReferenceHead:
    """What :func:`map_reference_head` found: ``layout`` ('smaf': cov_feat+bn+fc8; 'eps' / 'psa' / 'seam': fc8 on
    conv6), the architecture it implies (``num_classes``, ``head`` 'smaf'|'cls', ``feat_dim``), ``state`` (CAMNet
    keys: ``backbone.*`` + head), ``dropped`` (reference keys that are not a CAM head) and ``notes``."""

    layout: str
    num_classes: int
    head: str
    feat_dim: int
    state: dict
    dropped: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def describe(self) -> str:
        text = f"{self.layout} layout ({'; '.join(self.notes)})"
        if self.dropped:
            text += f"; dropped {len(self.dropped)} keys that are not a CAM head{_examples(self.dropped)}"
        return text


def _names(keys, limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def map_reference_head(state: Mapping[str, torch.Tensor], path: str | os.PathLike, num_classes: int | None = None,
                       background: bool | None = None, feat_dim: int | None = None, bn_eps: float = 1e-5
                       ) -> ReferenceHead:
    """Map a reference-layout state dict (flat ResNet-38 keys + head, ``module.`` already stripped) onto CAMNet.

    Args:
        num_classes: C (the model's or the dataset's); None = infer it (SMAF / SEAM layouts: K = C+1).
        background: the target head has the background channel (True), has not (False), either (None: decided by
            K against C).
        feat_dim: the target's feature width F; None = the file's (SMAF head) or max(128, 2K) (fc8 on conv6).
        bn_eps: the target feature BN's eps (the identity BN of the conv6 embedding).

    Any head that does not map is a one-line :class:`WeightsError` naming ``path``, the keys and the fix."""
    where = f"weights file {path}"
    backbone = {k: v for k, v in state.items() if RESNET38D_KEY.match(k)}
    rest = {k: v for k, v in state.items() if k not in backbone}
    dropped = [k for k in rest if k.startswith(REFERENCE_DROPPED_PREFIXES)]
    unknown = [k for k in rest if k not in REFERENCE_HEAD_KEYS and k not in dropped]
    if unknown:
        raise WeightsError(f"{where}: head keys {_names(unknown)} are not a reference CAM head "
                           f"(cov_feat, bn, fc8 of SMAF; fc8 of PSA/SEAM/EPS) and cannot be mapped onto smaf's "
                           f"CAMNet head (feature_conv, feature_bn, classifier); {_REFERENCE_FIX}")
    fc8 = rest.get("fc8.weight")
    if fc8 is None:
        raise WeightsError(f"{where} has head keys ({', '.join(list(rest)[:_EXAMPLES])}) but no classifier "
                           f"fc8.weight, so it is not a CAM classifier (an AffinityNet?); {_REFERENCE_FIX}")
    if fc8.dim() != 4 or tuple(fc8.shape[2:]) != (1, 1):
        raise WeightsError(f"{where}: fc8.weight {_shape(fc8)} is not a 1x1 convolution [K, F, 1, 1]; "
                           f"{_REFERENCE_FIX}")
    smaf_head = any(k in rest for k in REFERENCE_HEAD_KEYS if k != "fc8.weight")
    seam = bool([k for k in dropped if k.startswith(_SEAM_PCM_PREFIXES)]) and "proj_fc.weight" not in rest
    layout = "smaf" if smaf_head else ("seam" if seam else "conv6")
    outputs = int(fc8.shape[0])
    # the class count and whether fc8 has a background row
    if num_classes is None:
        if layout == "conv6":
            raise WeightsError(f"{where}: fc8.weight {_shape(fc8)} is a classifier on conv6 whose {outputs} rows "
                               f"are either C classes (PSA) or C+1 with the background (EPS): give the number of "
                               f"classes (the dataset's labels) to load it")
        num_classes = outputs - 1
    fits = {True: outputs == num_classes + 1, False: outputs == num_classes}
    if background is None:
        background = fits[True]
    if not fits[background]:
        want = num_classes + 1 if background else num_classes
        raise WeightsError(f"{where}: fc8.weight {_shape(fc8)} has {outputs} outputs but the model needs {want} "
                           f"({num_classes} classes{' + background' if background else ''}): the file was trained "
                           f"for another label set or head; give a checkpoint for these classes, or "
                           f"{_REFERENCE_FIX}")
    if layout == "conv6":
        layout = "eps" if background else "psa"
    head_name = "smaf" if background else "cls"
    notes: list[str] = []
    head: dict[str, torch.Tensor] = {}
    if layout == "smaf":
        missing = [k for k in _SMAF_HEAD_REQUIRED if k not in rest]
        if missing:
            raise WeightsError(f"{where}: incomplete SMAF head, missing {', '.join(missing)} (has "
                               f"{', '.join(k for k in REFERENCE_HEAD_KEYS if k in rest)}); {_REFERENCE_FIX}")
        conv = rest["cov_feat.weight"]
        width = int(conv.shape[0])
        bad = [f"cov_feat.weight {_shape(conv)}"] if conv.dim() != 4 or tuple(conv.shape[2:]) != (1, 1) else []
        bad += [f"{k} {_shape(rest[k])}" for k in _SMAF_HEAD_REQUIRED[1:] if tuple(rest[k].shape) != (width,)]
        if int(fc8.shape[1]) != width:
            bad.append(f"fc8.weight {_shape(fc8)}")
        if feat_dim is not None and width != feat_dim:
            bad.append(f"cov_feat.weight {_shape(conv)} vs feat_dim {feat_dim}")
        if bad:
            raise WeightsError(f"{where}: SMAF head shapes do not fit a {width}-d feature head ({', '.join(bad)}); "
                               f"{_REFERENCE_FIX}")
        head = {REFERENCE_HEAD_KEYS[k]: v for k, v in rest.items() if k in REFERENCE_HEAD_KEYS}
        feat_dim = width
        notes.append("cov_feat -> feature_conv, bn -> feature_bn, fc8 -> classifier")
    else:
        if layout == "seam":   # SEAM: background first -> ours: last
            fc8 = torch.cat([fc8[1:], fc8[:1]]) if background else fc8
            notes.append("SEAM fc8 with the background first, moved last")
        feat_dim = max(DEFAULT_FEAT_DIM, 2 * outputs) if feat_dim is None else int(feat_dim)
        if feat_dim < 2 * outputs:
            raise WeightsError(f"{where}: fc8.weight {_shape(fc8)} on conv6 needs a head with feat_dim >= "
                               f"{2 * outputs} to be embedded exactly, the model has {feat_dim}; set "
                               f"model.feat_dim={2 * outputs} or {_REFERENCE_FIX}")
        conv = fc8.new_zeros((feat_dim, fc8.shape[1], 1, 1))
        conv[:outputs], conv[outputs:2 * outputs] = fc8, -fc8
        classifier = fc8.new_zeros((outputs, feat_dim, 1, 1))
        rows = torch.arange(outputs)
        classifier[rows, rows], classifier[rows, rows + outputs] = 1.0, -1.0
        head = {"feature_conv.weight": conv, "classifier.weight": classifier,
                "feature_bn.weight": fc8.new_ones(feat_dim), "feature_bn.bias": fc8.new_zeros(feat_dim),
                "feature_bn.running_mean": fc8.new_zeros(feat_dim),
                "feature_bn.running_var": fc8.new_full((feat_dim,), 1.0 - bn_eps),
                "feature_bn.num_batches_tracked": torch.tensor(0)}
        notes.append("fc8 on conv6 embedded exactly: feature_conv = [fc8; -fc8], identity feature_bn, "
                     "classifier = [I, -I]")
    notes.insert(0, f"fc8 {_shape(rest['fc8.weight'])}: {num_classes} classes"
                    f"{' + background (last)' if background else ', no background'}")
    mapped = {BACKBONE_PREFIX + k: v for k, v in backbone.items()}
    mapped.update(head)
    return ReferenceHead(layout, int(num_classes), head_name, int(feat_dim), mapped, sorted(dropped), notes)


def _unreadable(path: Path, err: Exception) -> WeightsError:
    reason = str(err).splitlines()[0] if str(err) else "corrupt"
    return WeightsError(f"cannot read weights file {path} ({err.__class__.__name__}: {reason}); "
                        "re-download or re-create it")


def _torch_load(path: Path) -> Any:
    """torch.load on CPU through the weights-only unpickler (:func:`smaf.safe_load.torch_load`): tensors, plain
    containers and numpy arrays/scalars only. A file that needs anything else (custom classes, functions) is
    refused in one line saying how to convert it; it is never unpickled in full."""
    from smaf.safe_load import UnreadableFileError, UnsafeFileError, torch_load

    try:
        return torch_load(path, "weights file")
    except UnsafeFileError as err:
        raise WeightsError(str(err)) from None
    except UnreadableFileError as err:
        reason = str(err).split(" is unreadable (", 1)[-1].rstrip(")")
        raise WeightsError(f"cannot read weights file {path} ({reason}); re-download or re-create it") from None


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


def _is_cam_net(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ("backbone", "feature_conv", "feature_bn", "classifier",
                                                  "num_classes", "has_background", "feat_dim"))


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
    reference = None
    if file_format == "torch" and not prefix and _is_cam_net(module) and is_reference_layout(state):
        reference = map_reference_head(state, path, num_classes=module.num_classes,
                                       background=module.has_background, feat_dim=module.feat_dim,
                                       bn_eps=module.feature_bn.eps)
        state = dict(reference.state)
        if getattr(module, "bg_bias", None) is not None:   # a background bias at 0 leaves the CAM unchanged
            state["bg_bias"] = torch.zeros(())
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
    if reference is not None:
        head_problems = [k for k in missing + unexpected + [k for k, _, _ in shape_mismatched]
                         if not k.startswith(BACKBONE_PREFIX)]
        if head_problems:   # never a partly random head
            raise WeightsError(f"weights in {path} ({reference.layout} layout) do not fill the head of "
                               f"{type(module).__name__}: {detail}; {_REFERENCE_FIX}")
        detail += f"; {reference.describe()}"
    elif not _is_cam_net(module):
        head_keys = [k for k in unexpected if k in REFERENCE_HEAD_KEYS]
        if head_keys:
            detail += (f"; its head ({', '.join(head_keys[:_EXAMPLES])}) is not loaded into a backbone: give the "
                       f"file as fusion.checkpoint to use it")

    # Loading a fresh dict copy: load_state_dict fills absent BN counters into the dict it is given.
    module.load_state_dict(dict(loadable), strict=False)
    summary = f"loaded {len(loaded)}/{total} tensors from {path}; {detail}"
    print(summary, flush=True)
    return {"path": str(path), "format": file_format, "loaded": loaded, "total": total, "missing": missing,
            "unexpected": unexpected, "shape_mismatched": shape_mismatched, "ignored": ignored,
            "summary": summary}


def load_exact_state(module: nn.Module, state: Mapping[str, torch.Tensor], source: str | os.PathLike,
                     what: str = "weights") -> None:
    """Load ``state`` into ``module`` only if its keys and shapes are exactly the module's (a converted or
    foreign-layout file must fill every tensor: a partial load would be a silent bug). Otherwise one-line
    :class:`WeightsError` naming ``source`` and the first missing, unexpected and shape-mismatched keys; nothing
    is loaded then."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape_mismatched = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
                        if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape_mismatched:
        raise WeightsError(f"{what} {source} do not fit {type(module).__name__}: missing {len(missing)}"
                           f"{_examples(missing)}; unexpected {len(unexpected)}{_examples(unexpected)}; "
                           f"shape-mismatched {len(shape_mismatched)}{_examples(shape_mismatched)}")
    module.load_state_dict(dict(state), strict=True)
