"""Poly SGD: 4 groups (x1, x2, x10, x20), weight decay on weights only, resumable schedule."""
from __future__ import annotations

import pytest
import torch

from smaf.optim import PolySGD, build_poly_sgd

LR0, WD, MAX_STEP = 0.01, 5e-4, 10
MULTIPLIERS = [1.0, 2.0, 10.0, 20.0]


def _groups():
    torch.manual_seed(0)
    return [[torch.nn.Parameter(torch.randn(3, 2))], [torch.nn.Parameter(torch.randn(3))],
            [torch.nn.Parameter(torch.randn(4, 2))], [torch.nn.Parameter(torch.randn(4))]]


def _set_grads(groups, step):
    for index, group in enumerate(groups):
        for p in group:
            p.grad = torch.full_like(p, 0.1 * (step + 1) + index)


def test_lr_follows_poly_schedule_for_every_group():
    groups = _groups()
    optimizer = build_poly_sgd(groups, LR0, WD, momentum=0.0, max_step=MAX_STEP)
    for t in range(MAX_STEP):
        _set_grads(groups, t)
        before = [g[0].detach().clone() for g in groups]
        optimizer.step()
        for index, (group, old) in enumerate(zip(groups, before)):
            expected_lr = LR0 * MULTIPLIERS[index] * (1 - t / MAX_STEP) ** 0.9
            assert optimizer.param_groups[index]["lr"] == pytest.approx(expected_lr, rel=1e-12)
            wd = WD if index in (0, 2) else 0.0
            expected = old - expected_lr * (group[0].grad + wd * old)
            assert torch.allclose(group[0].detach(), expected, atol=1e-7)
    assert optimizer.global_step == MAX_STEP


def test_bias_groups_have_no_weight_decay():
    optimizer = build_poly_sgd(_groups(), LR0, WD, momentum=0.0, max_step=MAX_STEP)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [WD, 0.0, WD, 0.0]
    assert [g["lr_mult"] for g in optimizer.param_groups] == MULTIPLIERS
    assert all(g["momentum"] == 0.0 for g in optimizer.param_groups)
    assert isinstance(optimizer, torch.optim.SGD)


def test_empty_groups_are_fine():
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = build_poly_sgd([[weight], [], [], []], LR0, WD, momentum=0.0, max_step=MAX_STEP)
    weight.grad = torch.ones(2)
    optimizer.step()
    assert len(optimizer.param_groups) == 4
    assert torch.allclose(weight.detach(), torch.full((2,), 1 - LR0 * (1 + WD)))


def test_lr_stays_at_its_last_value_past_max_step():
    optimizer = build_poly_sgd(_groups(), LR0, WD, momentum=0.0, max_step=4)
    last = [LR0 * m * (1 - 3 / 4) ** 0.9 for m in MULTIPLIERS]
    for _ in range(6):
        optimizer.step()
    assert optimizer.current_lrs() == pytest.approx(last)


def test_state_dict_round_trip_continues_the_schedule_exactly():
    # Reference run: 8 uninterrupted steps (with momentum so its buffers must survive too).
    reference_groups = _groups()
    reference = build_poly_sgd(reference_groups, LR0, WD, momentum=0.9, max_step=MAX_STEP)
    for t in range(8):
        _set_grads(reference_groups, t)
        reference.step()

    # Interrupted run: 3 steps, save, fresh model + optimiser, load, 5 more steps.
    groups = _groups()
    optimizer = build_poly_sgd(groups, LR0, WD, momentum=0.9, max_step=MAX_STEP)
    for t in range(3):
        _set_grads(groups, t)
        optimizer.step()
    saved_params = [[p.detach().clone() for p in g] for g in groups]
    saved_state = optimizer.state_dict()

    resumed_groups = [[torch.nn.Parameter(p.clone()) for p in g] for g in saved_params]
    resumed = build_poly_sgd(resumed_groups, LR0, WD, momentum=0.9, max_step=MAX_STEP)
    resumed.load_state_dict(saved_state)
    assert resumed.global_step == 3
    assert resumed.current_lrs() == pytest.approx([LR0 * m * (1 - 3 / MAX_STEP) ** 0.9 for m in MULTIPLIERS])
    for t in range(3, 8):
        _set_grads(resumed_groups, t)
        resumed.step()
    for ref_group, group in zip(reference_groups, resumed_groups):
        assert torch.allclose(ref_group[0].detach(), group[0].detach(), atol=1e-7)
    assert resumed.global_step == reference.global_step == 8


def test_rejects_wrong_group_count_and_bad_max_step():
    with pytest.raises(ValueError, match="4 parameter lists"):
        build_poly_sgd(_groups()[:3], LR0, WD, momentum=0.0, max_step=MAX_STEP)
    with pytest.raises(ValueError, match="max_step"):
        PolySGD([{"params": _groups()[0]}], base_lr=LR0, max_step=0)
