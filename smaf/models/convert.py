"""MXNet ResNet-38 (ademxapp model A1) parameters -> a PyTorch state dict for :class:`ResNet38d`.

    python -m smaf.models.convert ilsvrc-cls_rna-a1_cls1000_ep-0001.params weights/resnet38d_imagenet.pth

Key mapping (related-methods.md §1.2), after stripping the ``arg:`` / ``aux:`` prefix and splitting on '_':

* ``conv1a_weight`` -> ``conv1a.weight``; ``linear1000_*`` (the ImageNet classifier) is dropped;
* block parameters ``{bn|res}{stage}{a|b<k>}_{branch}_...``: block ``2a`` -> ``b2``, ``4b3`` -> ``b4_3``;
  ``res..._weight`` -> ``conv_{branch}.weight``; ``bn..._{gamma, beta, moving_mean, moving_var}`` ->
  ``bn_{branch}.{weight, bias, running_mean, running_var}``;
* the rest (``bn7_*``) -> ``bn7.*``.

A name that fits none of these raises ValueError: the file is then not this model's.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from smaf.models.mxnet_params import read_mxnet_params
from smaf.runtime import EXIT_EXPECTED_ERROR

_BN_SUFFIXES = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var"}
_BLOCK_RE = re.compile(r"^(bn|res)(\d+)(a|b(\d+))$")
_BRANCH_RE = re.compile(r"^branch(1|2a|2b\d+)$")
_DROPPED_PREFIX = "linear1000"


def strip_mxnet_prefix(name: str) -> str:
    """``arg:bn7_gamma`` / ``aux:bn7_moving_var`` -> ``bn7_gamma`` / ``bn7_moving_var``."""
    for prefix in ("arg:", "aux:"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def mxnet_key_to_torch(name: str) -> str | None:
    """One MXNet parameter name (with or without ``arg:``/``aux:``) -> the ResNet38d state-dict key, or None
    for a parameter that has no counterpart (the ImageNet classifier ``linear1000_*``).

    >>> mxnet_key_to_torch("aux:bn4b3_branch2b1_moving_var")
    'b4_3.bn_branch2b1.running_var'
    """
    bare = strip_mxnet_prefix(name)
    tokens = bare.split("_")
    if tokens[0] == "conv1a" and bare == "conv1a_weight":
        return "conv1a.weight"
    if tokens[0] == _DROPPED_PREFIX:
        return None
    if len(tokens) >= 3 and "branch" in tokens[1]:
        block, branch, suffix = tokens[0], tokens[1], "_".join(tokens[2:])
        block_match, branch_match = _BLOCK_RE.match(block), _BRANCH_RE.match(branch)
        if block_match is None or branch_match is None:
            raise ValueError(f"MXNet parameter '{name}' is not a ResNet-38 block parameter "
                             "(expected e.g. res4b3_branch2a_weight or bn2a_branch1_gamma)")
        kind, stage, _, index = block_match.groups()
        module = f"b{stage}" if index is None else f"b{stage}_{index}"
        if kind == "res" and suffix == "weight":
            return f"{module}.conv_{branch}.weight"
        if kind == "bn" and suffix in _BN_SUFFIXES:
            return f"{module}.bn_{branch}.{_BN_SUFFIXES[suffix]}"
        raise ValueError(f"MXNet parameter '{name}': unexpected suffix '{suffix}' for a {kind} layer")
    if tokens[0] == "bn7" and "_".join(tokens[1:]) in _BN_SUFFIXES:
        return f"bn7.{_BN_SUFFIXES['_'.join(tokens[1:])]}"
    raise ValueError(f"MXNet parameter '{name}' does not belong to ResNet-38 model A1 "
                     "(expected conv1a_*, res*/bn*_branch*, bn7_* or linear1000_*)")


def mxnet_to_resnet38d(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """``{MXNet name: array}`` (from :func:`read_mxnet_params`) -> ResNet38d state dict (float32 CPU tensors).

    The ImageNet classifier is dropped. Two names mapping to the same key, or a name of another model, raise
    ValueError. Integer arrays are refused (a float parameter file is expected)."""
    state: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for name, array in arrays.items():
        key = mxnet_key_to_torch(name)
        if key is None:
            continue
        if key in state:
            raise ValueError(f"MXNet parameters '{sources[key]}' and '{name}' both map to '{key}'")
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(f"MXNet parameter '{name}' has dtype {array.dtype}; expected floating point")
        state[key] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        sources[key] = name
    return state


def check_against_model(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, list]:
    """Compare a state dict with ``model`` by name and shape. Returns ``{'missing': [...], 'unexpected': [...],
    'shape_mismatched': [(key, state shape, model shape)]}``; BN ``num_batches_tracked`` counters are never
    reported missing (they are unused by a frozen BN and absent from MXNet/old PyTorch files)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shape_mismatched = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
                        if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    return {"missing": missing, "unexpected": unexpected, "shape_mismatched": shape_mismatched}


def _examples(keys, limit: int = 3) -> str:
    shown = ", ".join(str(k) for k in list(keys)[:limit])
    return f" (e.g. {shown})" if keys else ""


def convert(in_path: str | os.PathLike, out_path: str | os.PathLike, allow_partial: bool = False) -> str:
    """Convert ``in_path`` (.params) to ``out_path`` (a plain ResNet38d state dict, written atomically).

    Returns the summary line. Raises ValueError when the result does not fit ResNet38d (missing, unexpected or
    shape-mismatched keys) unless ``allow_partial``; nothing is written then."""
    from smaf.io import atomic_save
    from smaf.models.resnet38d import ResNet38d

    arrays = read_mxnet_params(in_path)
    state = mxnet_to_resnet38d(arrays)
    dropped = sorted(strip_mxnet_prefix(n) for n in arrays if mxnet_key_to_torch(n) is None)
    model = ResNet38d()
    report = check_against_model(state, model)
    problems = {k: v for k, v in report.items() if v}
    if not problems:
        # A real load, as users will do it: proves the file is usable, not just well named.
        model.load_state_dict(state, strict=False)
    summary = (f"converted {len(state)} tensors from {in_path} ({len(arrays)} arrays; dropped {len(dropped)}"
               f"{_examples(dropped)}); ResNet38d: missing {len(report['missing'])}{_examples(report['missing'])}, "
               f"unexpected {len(report['unexpected'])}{_examples(report['unexpected'])}, "
               f"shape-mismatched {len(report['shape_mismatched'])}{_examples(report['shape_mismatched'])}")
    if problems and not allow_partial:
        raise ValueError(f"{summary}; not written (use --allow-partial to write it anyway)")
    atomic_save(out_path, lambda tmp: torch.save(state, tmp))
    return f"{summary}; wrote {out_path}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m smaf.models.convert",
        description="Convert MXNet ResNet-38 weights (ilsvrc-cls_rna-a1_cls1000_ep-0001.params from the "
                    "itijyou/ademxapp model zoo) to a PyTorch state dict for smaf's ResNet38d.")
    parser.add_argument("input", type=Path, help="MXNet .params file")
    parser.add_argument("output", type=Path, help="output .pth (a plain state dict)")
    parser.add_argument("--allow-partial", action="store_true",
                        help="write the file even if some ResNet38d keys are missing or do not fit")
    args = parser.parse_args(argv)
    try:
        print(convert(args.input, args.output, allow_partial=args.allow_partial), flush=True)
    except (OSError, ValueError) as err:
        if os.environ.get("SMAF_DEBUG"):
            raise
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return EXIT_EXPECTED_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
