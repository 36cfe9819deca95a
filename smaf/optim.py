"""The PSA-lineage poly SGD (``PolyOptimizer`` of PSA / SEAM / EPS / SMAF), with momentum made explicit.

Four parameter groups, as returned by :meth:`smaf.models.CAMNet.param_groups`:

=====================  ===============  ============
group                  lr               weight decay
=====================  ===============  ============
pretrained weights     1 x lr           wd
pretrained biases      2 x lr           0
new (head) weights     10 x lr          wd
new (head) biases      20 x lr          0
=====================  ===============  ============

Step t (0-based, counted by the optimiser) uses lr_t = multiplier * lr0 * (1 - t / max_step) ** power, power 0.9.
Past ``max_step`` the lr stays at its last value (as in the reference; training normally stops there).

Momentum: the reference calls ``torch.optim.SGD.__init__(params, lr, weight_decay)`` positionally, and SGD's
third positional argument is ``momentum``: the reference trains with momentum 5e-4, i.e. effectively none, and
with weight decay only through its per-group values (related-methods.md §1.3). Here momentum is an explicit
config value whose default 0 reproduces that.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

LR_MULTIPLIERS = (1.0, 2.0, 10.0, 20.0)
GROUP_HAS_WEIGHT_DECAY = (True, False, True, False)
GROUP_NAMES = ("pretrained_weights", "pretrained_biases", "new_weights", "new_biases")
_STATE_KEY = "poly_schedule"


class PolySGD(torch.optim.SGD):
    """SGD whose every group's lr follows ``group['lr_mult'] * base_lr * (1 - t / max_step) ** power``.

    ``param_groups`` are dicts with ``params``, ``lr_mult`` and ``weight_decay`` (and optionally ``name``);
    :func:`build_poly_sgd` makes them from the 4 lists of a CAMNet. The step counter ``global_step`` is part of
    :meth:`state_dict`, so a resumed run continues the schedule exactly.
    """

    def __init__(self, param_groups: Sequence[dict], base_lr: float, max_step: int, power: float = 0.9,
                 momentum: float = 0.0):
        if max_step < 1:
            raise ValueError(f"PolySGD: max_step must be >= 1, got {max_step}")
        groups = []
        for group in param_groups:
            group = dict(group)
            group.setdefault("lr_mult", 1.0)
            group["lr"] = base_lr * group["lr_mult"]
            groups.append(group)
        super().__init__(groups, lr=base_lr, momentum=momentum)
        self.base_lr = float(base_lr)
        self.max_step = int(max_step)
        self.power = float(power)
        self.global_step = 0

    def lr_factor(self, step: int | None = None) -> float:
        """(1 - t / max_step) ** power for step t (default: the next step); frozen at its last value past the
        end."""
        t = min(self.global_step if step is None else step, self.max_step - 1)
        return (1.0 - t / self.max_step) ** self.power

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

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state[_STATE_KEY] = {"global_step": self.global_step, "max_step": self.max_step, "power": self.power,
                             "base_lr": self.base_lr}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore SGD state and the schedule position. ``max_step``, ``power`` and ``base_lr`` stay those
        this optimiser was built with (a resumed run may change them on purpose); only the step counter is
        taken from the file."""
        state_dict = dict(state_dict)
        schedule = state_dict.pop(_STATE_KEY, None)
        super().load_state_dict(state_dict)
        if schedule is not None:
            self.global_step = int(schedule["global_step"])
        for group, lr in zip(self.param_groups, self.current_lrs()):
            group["lr"] = lr


def build_poly_sgd(groups: Sequence[Sequence[torch.nn.Parameter]], lr: float, weight_decay: float,
                   momentum: float, max_step: int, power: float = 0.9) -> PolySGD:
    """PolySGD from the 4 lists [pretrained weights, pretrained biases, new weights, new biases]
    (``CAMNet.param_groups()``): lr x1 / x2 / x10 / x20, weight decay on the weight groups only. Empty lists
    are fine (EfficientNet and ResNet-38 convs have no biases); all 4 groups are kept so checkpoints of every
    backbone have the same layout."""
    if len(groups) != 4:
        raise ValueError(f"build_poly_sgd: expected 4 parameter lists ({', '.join(GROUP_NAMES)}), got {len(groups)}")
    param_groups = [
        {"params": list(params), "lr_mult": mult, "weight_decay": weight_decay if has_wd else 0.0, "name": name}
        for params, mult, has_wd, name in zip(groups, LR_MULTIPLIERS, GROUP_HAS_WEIGHT_DECAY, GROUP_NAMES)
    ]
    return PolySGD(param_groups, base_lr=lr, max_step=max_step, power=power, momentum=momentum)
