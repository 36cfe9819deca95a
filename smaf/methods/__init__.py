"""Stage-0 methods: how the initial classifier is trained (``train_cls.method``).

A method is a small object, registered by name with :func:`register_method`:

* ``head``: the CAM head it trains (``"cls"``: C outputs; ``"smaf"``: C+1, background last);
* ``needs_saliency``: whether its batches carry the saliency map (``data.saliency_dir``);
* ``make_step(opts, num_classes, device) -> step(model, batch, iteration) -> (loss, logs)``, where ``opts`` is
  the method's config sub-section ``train_cls.<name>`` (its defaults: ``smaf/configs/methods/train_cls/<name>.yaml``).
  :class:`ClassifierMethod` makes the step of one forward pass; a method then only defines ``loss``.

Every method shares the network module, the data module, the training loop and the stage; a new method is a
module here plus its config fragment.
"""
from __future__ import annotations

_METHODS: dict = {}


class ClassifierMethod:
    """A stage-0 method trained with one forward pass of the CAM network per batch: subclasses set ``name``,
    ``head``, ``needs_saliency`` and define :meth:`loss`."""

    name = ""
    head = "cls"
    needs_saliency = False

    def loss(self, outputs, batch: dict, labels, opts, num_classes: int, device):
        """``outputs`` = the model's ``(logits (B, K), cam (B, K, h, w), f)``; ``labels`` (B, C) on the device.
        Returns (loss tensor, {name: float} for the log)."""
        raise NotImplementedError

    def make_step(self, opts, num_classes: int, device):
        """``step(model, batch, iteration) -> (loss, logs)`` for :func:`smaf.engine.train_loop`."""

        def step(model, batch, iteration):
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            return self.loss(model(images), batch, labels, opts, num_classes, device)

        return step


def register_method(cls):
    """Class decorator: register a stage-0 method under ``cls.name``."""
    _METHODS[cls.name] = cls()
    return cls


def get_method(name: str):
    """The registered method ``name``; an unknown name is a ConfigError naming ``train_cls.method``."""
    from ..config import ConfigError

    _import_builtin()
    if name not in _METHODS:
        raise ConfigError(f"train_cls.method={name!r}: expected one of {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def method_names() -> list[str]:
    _import_builtin()
    return sorted(_METHODS)


def _import_builtin() -> None:
    from . import cam, eps  # noqa: F401  (importing registers them)
