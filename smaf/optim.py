"""Optimisers with their learning-rate schedules, chosen by a training section's ``optimizer`` key.

Every model lists its trainable parameters in four groups (``model.param_groups()``: pretrained weights,
pretrained biases, new weights, new biases); each optimiser gives each group an lr multiplier and decides
where weight decay applies, and a schedule factor f(t) scales every group's lr at step t:

=====================  =====================================  ==============================================
group                  ``poly_sgd`` (PSA lineage)              ``adamw`` (AFA / SegFormer style)
=====================  =====================================  ==============================================
pretrained weights     1 x lr, wd                              1 x lr, wd
pretrained biases      2 x lr, no wd                           1 x lr, no wd
new (head) weights     10 x lr, wd                             head_lr_mult x lr, wd
new (head) biases      20 x lr, no wd                          head_lr_mult x lr, no wd
schedule f(t)          (1 - t/T)^0.9                           linear warm-up from warmup_ratio over
                                                               warmup_iters steps, then (1 - t/T)^power
=====================  =====================================  ==============================================

Step t (0-based, counted by the optimiser) uses lr_t = multiplier * lr0 * f(t); past T the factor stays at
its last value (as in the reference; training normally stops there). The step counter is part of
``state_dict``, so a resumed run continues the schedule exactly.

Momentum of ``poly_sgd``: the reference calls ``torch.optim.SGD.__init__(params, lr, weight_decay)``
positionally, and SGD's third positional argument is ``momentum``: the reference trains with momentum 5e-4,
i.e. effectively none, and with weight decay only through its per-group values (related-methods.md §1.3).
Here momentum is an explicit config value whose default 0 reproduces that.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

LR_MULTIPLIERS = (1.0, 2.0, 10.0, 20.0)
GROUP_HAS_WEIGHT_DECAY = (True, False, True, False)
GROUP_NAMES = ("pretrained_weights", "pretrained_biases", "new_weights", "new_biases")
OPTIMIZERS = ("poly_sgd", "adamw")
_STATE_KEY = "poly_schedule"


class _ScheduledMixin:
    """Per-group ``lr = group['lr_mult'] * base_lr * lr_factor(t)``, the step counter saved with the state.
    Subclasses define :meth:`lr_factor`."""

    def _init_schedule(self, base_lr: float, max_step: int) -> None:
        if max_step < 1:
            raise ValueError(f"{type(self).__name__}: max_step must be >= 1, got {max_step}")
        self.base_lr = float(base_lr)
        self.max_step = int(max_step)
        self.global_step = 0

    @staticmethod
    def _with_lr(param_groups: Sequence[dict], base_lr: float) -> list:
        groups = []
        for group in param_groups:
            group = dict(group)
            group.setdefault("lr_mult", 1.0)
            group["lr"] = base_lr * group["lr_mult"]
            groups.append(group)
        return groups

    def current_lrs(self) -> list[float]:
        """The lr each group will use at the next ``step()``."""
        factor = self.lr_factor()
        return [self.base_lr * group["lr_mult"] * factor for group in self.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        for group, lr in zip(self.param_groups, self.current_lrs()):
            group["lr"] = lr
        loss = super().step(closure)
        self.global_step += 1
        return loss

    def _schedule_state(self) -> dict:
        return {"global_step": self.global_step, "max_step": self.max_step, "base_lr": self.base_lr}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[_STATE_KEY] = self._schedule_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the optimiser state and the schedule position. The schedule's constants stay those this
        optimiser was built with (a resumed run may change them on purpose); only the step counter is taken
        from the file."""
        state_dict = dict(state_dict)
        schedule = state_dict.pop(_STATE_KEY, None)
        super().load_state_dict(state_dict)
        if schedule is not None:
            self.global_step = int(schedule["global_step"])
        for group, lr in zip(self.param_groups, self.current_lrs()):
            group["lr"] = lr


class PolySGD(_ScheduledMixin, torch.optim.SGD):
    """SGD whose every group's lr follows ``group['lr_mult'] * base_lr * (1 - t / max_step) ** power``.

    ``param_groups`` are dicts with ``params``, ``lr_mult`` and ``weight_decay`` (and optionally ``name``);
    :func:`build_poly_sgd` makes them from the 4 lists of a CAMNet.
    """

    def __init__(self, param_groups: Sequence[dict], base_lr: float, max_step: int, power: float = 0.9,
                 momentum: float = 0.0):
        self._init_schedule(base_lr, max_step)
        torch.optim.SGD.__init__(self, self._with_lr(param_groups, base_lr), lr=base_lr, momentum=momentum)
        self.power = float(power)

    def lr_factor(self, step: int | None = None) -> float:
        """(1 - t / max_step) ** power for step t (default: the next step); frozen at its last value past the
        end."""
        t = min(self.global_step if step is None else step, self.max_step - 1)
        return (1.0 - t / self.max_step) ** self.power

    def _schedule_state(self) -> dict:
        return {**super()._schedule_state(), "power": self.power}


class WarmupPolyAdamW(_ScheduledMixin, torch.optim.AdamW):
    """AdamW with a linear warm-up then poly decay: factor ``warmup_ratio + (1 - warmup_ratio) * t / warmup_iters``
    for t < warmup_iters, else ``(1 - t / max_step) ** power`` (AFA's schedule, related-methods.md §7)."""

    def __init__(self, param_groups: Sequence[dict], base_lr: float, max_step: int, warmup_iters: int = 1500,
                 warmup_ratio: float = 1e-6, power: float = 1.0, betas=(0.9, 0.999)):
        self._init_schedule(base_lr, max_step)
        torch.optim.AdamW.__init__(self, self._with_lr(param_groups, base_lr), lr=base_lr, betas=tuple(betas))
        self.warmup_iters, self.warmup_ratio, self.power = int(warmup_iters), float(warmup_ratio), float(power)

    def lr_factor(self, step: int | None = None) -> float:
        t = min(self.global_step if step is None else step, self.max_step - 1)
        if t < self.warmup_iters:
            return self.warmup_ratio + (1.0 - self.warmup_ratio) * t / self.warmup_iters
        return (1.0 - t / self.max_step) ** self.power


def _four_groups(groups: Sequence[Sequence[torch.nn.Parameter]], multipliers: Sequence[float],
                 weight_decay: float, what: str) -> list[dict]:
    if len(groups) != 4:
        raise ValueError(f"{what}: expected 4 parameter lists ({', '.join(GROUP_NAMES)}), got {len(groups)}")
    return [{"params": list(params), "lr_mult": float(mult), "weight_decay": weight_decay if has_wd else 0.0,
             "name": name}
            for params, mult, has_wd, name in zip(groups, multipliers, GROUP_HAS_WEIGHT_DECAY, GROUP_NAMES)]


def build_poly_sgd(groups: Sequence[Sequence[torch.nn.Parameter]], lr: float, weight_decay: float,
                   momentum: float, max_step: int, power: float = 0.9) -> PolySGD:
    """PolySGD from the 4 lists [pretrained weights, pretrained biases, new weights, new biases]
    (``CAMNet.param_groups()``): lr x1 / x2 / x10 / x20, weight decay on the weight groups only. Empty lists
    are fine (EfficientNet and ResNet-38 convs have no biases); all 4 groups are kept so checkpoints of every
    backbone have the same layout."""
    return PolySGD(_four_groups(groups, LR_MULTIPLIERS, weight_decay, "build_poly_sgd"), base_lr=lr,
                   max_step=max_step, power=power, momentum=momentum)


def build_adamw(groups: Sequence[Sequence[torch.nn.Parameter]], lr: float, weight_decay: float, max_step: int,
                head_lr_mult: float = 10.0, warmup_iters: int = 1500, warmup_ratio: float = 1e-6,
                power: float = 1.0, betas=(0.9, 0.999)) -> WarmupPolyAdamW:
    """WarmupPolyAdamW from the 4 parameter lists: pretrained x1, new x ``head_lr_mult``, weight decay on the
    weight groups only."""
    mults = (1.0, 1.0, head_lr_mult, head_lr_mult)
    return WarmupPolyAdamW(_four_groups(groups, mults, weight_decay, "build_adamw"), base_lr=lr, max_step=max_step,
                           warmup_iters=warmup_iters, warmup_ratio=warmup_ratio, power=power, betas=betas)


def build_optimizer(sect, groups: Sequence[Sequence[torch.nn.Parameter]], max_step: int, section: str = ""):
    """The optimiser a training section asks for: ``sect.optimizer`` (``poly_sgd`` | ``adamw``) with its
    constants in ``sect.<optimizer>`` (the fragment ``smaf/configs/optimizers/<name>.yaml``), ``sect.lr`` and
    ``sect.weight_decay``; ``max_step`` = the training length. A bad name or length is a ConfigError naming the key."""
    from .config import ConfigError

    where = f"{section}." if section else ""
    name = str(sect.get("optimizer", "poly_sgd"))
    if name not in OPTIMIZERS:
        raise ConfigError(f"{where}optimizer={name!r}: expected one of {', '.join(OPTIMIZERS)}")
    if int(max_step) < 1:
        raise ConfigError(f"{where}iterations={max_step}: must be >= 1")
    opts = sect.get(name) or {}
    if name == "poly_sgd":
        return build_poly_sgd(groups, lr=sect.lr, weight_decay=sect.weight_decay,
                              momentum=float(opts.get("momentum", 0.0)), max_step=max_step,
                              power=float(opts.get("power", 0.9)))
    return build_adamw(groups, lr=sect.lr, weight_decay=sect.weight_decay, max_step=max_step,
                       head_lr_mult=float(opts.get("head_lr_mult", 10.0)),
                       warmup_iters=int(opts.get("warmup_iters", 1500)),
                       warmup_ratio=float(opts.get("warmup_ratio", 1e-6)), power=float(opts.get("power", 1.0)),
                       betas=tuple(opts.get("betas", (0.9, 0.999))))
