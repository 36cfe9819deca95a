"""Stage-0 methods: how the initial classifier is trained (``train_cls.method``).

A method is a small object, registered by name with :func:`register_method`:

* ``head``: the CAM head it trains (``"cls"``: C outputs; ``"smaf"``: C+1, background last);
  ``head_for(opts)`` when it depends on the method's options (PPC on SEAM or on EPS);
* ``needs_saliency``: whether its batches carry the saliency map (``data.saliency_dir``); ``needs_saliency_for(opts)``;
* ``aux_heads(opts)``: the auxiliary heads of :class:`~smaf.models.cam_net.CAMNet` it trains (PCM, projection,
  sub-categories), recorded in the checkpoints; stage 1 and later use only the CAM, as for every method;
* ``check_options(opts, section)``: a one-line ConfigError naming the key for a bad option, before any output;
* ``make_step(opts, num_classes, device) -> step(model, batch, iteration) -> (loss, logs)``, where ``opts`` is
  the method's config sub-section ``train_cls.<name>`` (its defaults: ``smaf/configs/methods/train_cls/<name>.yaml``).
  :class:`ClassifierMethod` makes the step of one forward pass; a method then only defines ``loss``.

Methods: ``cam`` (plain CAM), ``eps`` (EPS saliency loss), ``seam`` (SEAM: PCM + equivariant regularisation),
``ppc`` (pixel-to-prototype contrast on ``seam`` or ``eps``), ``sc_cam`` (SC-CAM sub-category rounds; its round
loop is :func:`smaf.methods.sc_cam.run_rounds`). docs/seed_methods.md describes them.

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

    def head_for(self, opts) -> str:
        """The head trained under options ``opts`` (default: :attr:`head`)."""
        return self.head

    def needs_saliency_for(self, opts) -> bool:
        """Whether batches need saliency maps under options ``opts`` (default: :attr:`needs_saliency`)."""
        return self.needs_saliency

    def aux_heads(self, opts) -> dict:
        """Keyword arguments of the auxiliary heads for :func:`smaf.models.build_model` (default: none)."""
        return {}

    def check_options(self, opts, section: str) -> None:
        """Raise a one-line ConfigError naming ``<section>.<key>`` for a bad option (default: nothing to check)."""

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
    from . import cam, eps, ppc, sc_cam, seam  # noqa: F401  (importing registers them)


def check_range(opts, section: str, key: str, low: float, high: float, low_open: bool = True,
                high_open: bool = False) -> float:
    """``opts[key]`` as a float within (low, high] (bounds open or closed as asked); else a one-line
    ConfigError naming ``<section>.<key>``."""
    from ..config import ConfigError

    value = opts.get(key) if hasattr(opts, "get") else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    ok = (number > low if low_open else number >= low) and (number < high if high_open else number <= high)
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{section}.{key}={value!r}: must be a number in {bounds}")
    return number


def check_choice(opts, section: str, key: str, choices: tuple) -> str:
    """``opts[key]`` as one of ``choices``; else a one-line ConfigError naming ``<section>.<key>``."""
    from ..config import ConfigError

    value = opts.get(key) if hasattr(opts, "get") else None
    if value not in choices:
        raise ConfigError(f"{section}.{key}={value!r}: expected one of {', '.join(map(str, choices))}")
    return value
