"""Registry of network architectures: a checkpoint records an architecture name and its constructor arguments
(``{'arch': name, 'args': {...}}``, the model's :attr:`arch_spec`), and :func:`build_from_spec` rebuilds any
registered architecture from it.

An architecture registers a constructor ``(**args) -> nn.Module`` with :func:`register_architecture`; the
arguments must be plain values (str, int, float, bool, lists), since they are stored in checkpoints. Weights
are never part of the arguments: a rebuilt model starts random and the checkpoint's state dict is loaded
into it.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register_architecture(name: str):
    """Decorator: register ``fn(**args) -> nn.Module`` as architecture ``name``. The built module gets
    ``arch_spec = {'arch': name, 'args': args}`` (see :func:`build_from_spec`)."""

    def wrap(fn):
        if name in _ARCHITECTURES and _ARCHITECTURES[name] is not fn:
            raise ValueError(f"architecture '{name}' is registered twice")
        _ARCHITECTURES[name] = fn
        return fn

    return wrap


def architectures() -> list[str]:
    """Names of the registered architectures."""
    _import_builtin()
    return sorted(_ARCHITECTURES)


def build_from_spec(spec: dict, **runtime) -> nn.Module:
    """Build the architecture ``spec['arch']`` with ``spec['args']`` (+ ``runtime`` keyword arguments that are
    not recorded, e.g. ``pretrained``); the module's ``arch_spec`` is set to ``spec``. An unknown name is a
    ValueError listing the registered ones."""
    _import_builtin()
    name, args = spec["arch"], dict(spec.get("args", {}))
    if name not in _ARCHITECTURES:
        raise ValueError(f"unknown architecture '{name}'; registered: {', '.join(sorted(_ARCHITECTURES))}")
    model = _ARCHITECTURES[name](**args, **runtime)
    model.arch_spec = {"arch": name, "args": args}
    return model


def _import_builtin() -> None:
    # The modules that register the built-in architectures (importing them registers them).
    from . import afa, affinity, cam_net, deeplab  # noqa: F401
