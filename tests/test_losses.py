"""Stage-0 and stage-2 losses against values computed by hand, pixel by pixel, in plain Python."""
import math

import numpy as np
import pytest
import torch

from smaf.losses import (eps_saliency_loss, multilabel_soft_margin, prototype_weights, self_training_loss,
                         self_training_target)


def _softmax(values):
    e = [math.exp(v) for v in values]
    return [x / sum(e) for x in e]


def test_eps_saliency_loss_matches_hand_computation():
    # C = 2 foreground classes + background (last), a 2x2 CAM; class 0 labelled, class 1 labelled too.
    cam = torch.tensor([[[[3.0, 0.0], [2.0, -1.0]],     # class 0
                         [[0.0, 2.5], [0.0, 0.0]],      # class 1
                         [[0.0, 0.0], [1.0, 2.0]]]])    # background
    saliency = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    labels = torch.tensor([[1.0, 1.0]])
    tau, lam = 0.4, 0.5
    loss, s_hat = eps_saliency_loss(cam, saliency, labels, tau=tau, lam=lam)

    probs = [[_softmax([cam[0, k, i, j].item() for k in range(3)]) for j in range(2)] for i in range(2)]
    sal = saliency[0, 0].tolist()
    overlap = []
    for c in range(2):
        inter = sum(round(probs[i][j][c]) * round(sal[i][j]) for i in range(2) for j in range(2))
        area = sum(round(probs[i][j][c]) for i in range(2) for j in range(2))
        overlap.append(inter / (area + 1e-4))
    fg = [c for c in range(2) if overlap[c] > tau]
    bg = [c for c in range(2) if overlap[c] <= tau]
    expected = 0.0
    for i in range(2):
        for j in range(2):
            m_fg = sum(probs[i][j][c] for c in fg)
            m_bg = probs[i][j][2] + sum(probs[i][j][c] for c in bg)
            pred = lam * m_fg + (1 - lam) * (1 - m_bg)
            assert s_hat[0, 0, i, j].item() == pytest.approx(pred, abs=1e-6)
            expected += (pred - sal[i][j]) ** 2 / 4
    # Class 0 wins pixels (0,0) (salient) and (1,0) (not salient): overlap 0.5 > 0.4 -> foreground.
    # Class 1 wins only (0,1), which is salient: overlap 1 -> foreground.
    assert fg == [0, 1]
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_eps_loss_unlabelled_class_is_in_neither_set():
    cam = torch.zeros(1, 3, 2, 2)
    cam[0, 1] = 5.0  # class 1 dominates but is not labelled
    loss, s_hat = eps_saliency_loss(cam, torch.ones(1, 1, 2, 2), torch.tensor([[1.0, 0.0]]), 0.4, 0.5)
    p = _softmax([0.0, 5.0, 0.0])
    # class 0 (labelled) never wins a pixel: overlap 0 -> background set with the bg channel
    expected = 0.5 * 0 + 0.5 * (1 - (p[0] + p[2]))
    assert s_hat[0, 0, 0, 0].item() == pytest.approx(expected, abs=1e-6)


def test_multilabel_soft_margin_is_mean_bce():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    bce = [-(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))
           for x, y in zip(logits[0].tolist(), labels[0].tolist())]
    assert multilabel_soft_margin(logits, labels).item() == pytest.approx(sum(bce) / 3, abs=1e-6)


def test_self_training_target_reactivation_by_hand():
    fused = torch.tensor([[[[0.8, 0.1]], [[0.4, 0.05]], [[0.9, 0.9]]]])   # (1, C=3, 1, 2)
    labels = torch.tensor([[1.0, 1.0, 0.0]])                                 # class 2 not in the image
    target = self_training_target(fused, labels, bg_score=0.2)
    assert target.shape == (1, 4, 1, 2)
    # pixel 0: [0.8, 0.4, 0, 0.2] / 0.8 ; pixel 1: [0.1, 0.05, 0, 0.2] / 0.2
    assert target[0, :, 0, 0].tolist() == pytest.approx([1.0, 0.5, 0.0, 0.25])
    assert target[0, :, 0, 1].tolist() == pytest.approx([0.5, 0.25, 0.0, 1.0])


def test_self_training_target_with_denoising_weights_by_hand():
    fused = torch.tensor([[[[0.8]], [[0.6]]]])          # (1, C=2, 1, 1)
    labels = torch.tensor([[1.0, 1.0]])
    weights = torch.tensor([[[[0.25]], [[0.9]]]])        # class 0 far from its prototype, class 1 close
    target = self_training_target(fused, labels, bg_score=0.2, weights=weights)
    # fg = [0.2, 0.54], bg 0.2 -> / 0.54
    assert target[0, :, 0, 0].tolist() == pytest.approx([0.2 / 0.54, 1.0, 0.2 / 0.54])


def test_prototype_weights_are_relu_cosine():
    feature = torch.tensor([[[[1.0]], [[0.0]]]])         # (1, D=2, 1, 1): f = (1, 0)
    protos = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    w = prototype_weights(feature, protos)[0, :, 0, 0].tolist()
    assert w == pytest.approx([1.0, 1 / math.sqrt(2), 0.0])


def test_self_training_loss_by_hand():
    student = torch.tensor([[[[0.0]], [[math.log(3.0)]]]])   # softmax -> [0.25, 0.75]
    target = torch.tensor([[[[1.0]], [[0.5]]]])
    loss = self_training_loss(student, target, weight=100.0)
    assert loss.item() == pytest.approx(100 * ((0.25 - 1) ** 2 + (0.75 - 0.5) ** 2) / 2, rel=1e-6)
    # the student CAM is upsampled to the target size first
    big_target = target.expand(1, 2, 4, 4)
    assert self_training_loss(student, big_target).item() == pytest.approx(loss.item(), rel=1e-6)
    assert np.isfinite(loss.item())
