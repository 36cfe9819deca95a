"""Stage 2's target rules, the ProDA-style denoising weights, the background bias and the collapse guard."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from smaf.config import ConfigError, load_config
from smaf.losses import (scale_matched_temperature, self_training_target, softmax_prototype_weights)
from smaf.stages.train_fusion import SelfTrainingTarget, collapse_guard, fit_background_bias


def test_target_with_a_per_image_background_score_by_hand():
    fused = torch.tensor([[[[0.9, 0.3]], [[0.0, 0.0]]], [[[0.5, 0.1]], [[0.2, 0.6]]]])   # (2, 2, 1, 2)
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    target = self_training_target(fused, labels, torch.tensor([0.4, 0.3]))
    # image 0 (bg 0.4): pixel 0 [0.9, 0, 0.4] / 0.9; pixel 1 [0.3, 0, 0.4] / 0.4
    np.testing.assert_allclose(target[0, :, 0, 0], [1.0, 0.0, 0.4 / 0.9], atol=1e-6)
    np.testing.assert_allclose(target[0, :, 0, 1], [0.75, 0.0, 1.0], atol=1e-6)
    # image 1 (bg 0.3): pixel 0 [0.5, 0.2, 0.3] / 0.5; pixel 1 [0.1, 0.6, 0.3] / 0.6
    np.testing.assert_allclose(target[1, :, 0, 0], [1.0, 0.4, 0.6], atol=1e-6)
    np.testing.assert_allclose(target[1, :, 0, 1], [1 / 6, 1.0, 0.5], atol=1e-6)
    # the argmax is the mask rule's partition: foreground exactly where the map exceeds the image's score
    same = self_training_target(fused, labels, 0.4)
    assert torch.equal(same[0], target[0])


def test_denoising_weights_over_classes_and_background_by_hand():
    sim = torch.tensor([[[[0.9]], [[0.5]], [[0.1]], [[0.3]]]])    # (1, C+1 = 4, 1, 1): classes 0, 1, 2 and bg
    labels = torch.tensor([[1.0, 0.0, 1.0]])                       # class 1 unlabelled
    w = softmax_prototype_weights(sim, labels, temperature=0.5)[0, :, 0, 0]
    e = [math.exp(0.9 / 0.5), math.exp(0.1 / 0.5), math.exp(0.3 / 0.5)]
    expected = [3 * v / sum(e) for v in e]
    np.testing.assert_allclose(w[[0, 2, 3]].numpy(), expected, rtol=1e-6)
    assert w[1] == 0.0
    assert float(w[[0, 2, 3]].mean()) == pytest.approx(1.0)


def test_denoising_weights_ignore_a_uniform_shift_and_are_uniform_for_equal_prototypes():
    torch.manual_seed(0)
    sim = torch.rand(2, 5, 3, 4) * 2 - 1
    labels = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    w = softmax_prototype_weights(sim, labels, 0.2)
    torch.testing.assert_close(softmax_prototype_weights(sim + 0.37, labels, 0.2), w)
    equal = softmax_prototype_weights(sim[:, :1].expand(-1, 5, -1, -1), labels, 0.2)
    keep = torch.cat([labels, torch.ones(2, 1)], 1)[:, :, None, None].expand_as(equal)
    torch.testing.assert_close(equal, keep)          # weight 1 on every kept channel: the target is unchanged
    fused = torch.rand(2, 4, 3, 4)
    torch.testing.assert_close(self_training_target(fused, labels, 0.2, equal[:, :4], equal[:, 4:]),
                               self_training_target(fused, labels, 0.2))


def test_scale_matched_temperature_is_the_mean_spread_over_kept_channels():
    sim = torch.tensor([[[[0.9, 0.2]], [[0.1, 0.8]], [[0.5, 0.5]]]])   # (1, 3, 1, 2), class 1 unlabelled
    labels = torch.tensor([[1.0, 0.0]])
    # kept: class 0 and background: spreads |0.9 - 0.5| and |0.2 - 0.5|
    assert scale_matched_temperature(sim, labels) == pytest.approx((0.4 + 0.3) / 2)


class _Head(torch.nn.Module):
    """A CAM 'network' whose class logits are fixed maps and whose background row is zero: the bias alone
    decides the partition."""

    def __init__(self, logits):
        super().__init__()
        from smaf.models.cam_net import CAMNet

        self.logits = logits
        self.num_classes, self.has_background = logits.shape[1] - 1, True
        self.bg_bias = None
        self.add_background_bias = CAMNet.add_background_bias.__get__(self)
        self.classifier = torch.nn.Conv2d(1, 1, 1)

    def forward(self, images):
        cam = self.logits.clone()
        if self.bg_bias is not None:
            cam[:, -1] += self.bg_bias
        return cam.mean((2, 3)), cam, None


def test_background_bias_reproduces_the_targets_partition_on_a_batch():
    torch.manual_seed(0)
    b, c, h, w = 3, 2, 8, 8
    fg = torch.rand(b, c, h, w) * 3
    logits = torch.cat([fg, torch.zeros(b, 1, h, w)], 1)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # a target whose partition a constant can reproduce: foreground where the labelled logit exceeds 1.7
    kept = fg.masked_fill(labels[:, :, None, None] < 0.5, -1).amax(1)
    target = torch.zeros(b, c + 1, h, w)
    target[:, :c] = (fg / 3) * labels[:, :, None, None]
    target[:, c] = torch.where(kept > 1.7, 0.0, 1.0)
    model = _Head(logits)
    bias, agreement = fit_background_bias(model, torch.zeros(b, 3, h, w), labels, target)
    assert agreement == 1.0 and float(model.bg_bias.detach()) == pytest.approx(bias)
    _, cam, _ = model(None)
    student_fg = cam[:, :c].masked_fill(labels[:, :, None, None] < 0.5, float("-inf")).amax(1) > cam[:, c]
    assert torch.equal(student_fg, target[:, :c].amax(1) >= target[:, c])
    # a noisy target: the chosen bias is the best constant (no other value of a fine grid agrees more)
    noisy = target.clone()
    flip = torch.rand(b, h, w) < 0.15
    noisy[:, c] = torch.where(flip, 1 - noisy[:, c], noisy[:, c])
    _, agreement = fit_background_bias(_Head(logits), None, labels, noisy)
    is_fg = noisy[:, :c].amax(1) >= noisy[:, c]
    best = max(float(((kept > t) == is_fg).float().mean()) for t in np.linspace(-0.5, 3.5, 801))
    assert agreement >= best - 1e-9


def test_target_rules_are_checked_and_read_from_the_config():
    sect = load_config("voc12", ["train_fusion.target_bg=rule", "train_fusion.denoise=true",
                                 "train_fusion.denoise_rule=softmax", "train_fusion.denoise_temperature=0.5"]).train_fusion
    target = SelfTrainingTarget(sect, 20, 112)
    assert target.target_bg == "rule" and target.rule == "softmax" and target.temperature == 0.5
    assert target.needs_teacher
    for key, value, match in (("target_bg", "median", "target_bg='median'"),
                              ("denoise_rule", "cosine", "denoise_rule='cosine'"),
                              ("denoise_temperature", "hot", "denoise_temperature='hot'"),
                              ("denoise_temperature", "-1", "must be > 0")):
        bad = load_config("voc12", [f"train_fusion.{key}={value}"]).train_fusion
        with pytest.raises(ConfigError, match=match):
            SelfTrainingTarget(bad, 20, 112)


def test_collapse_guard_fires_only_on_a_large_drop():
    guard = collapse_guard(10.0)
    assert guard({"val_miou": 60.0}, {"val_miou": 55.0}) is None
    message = guard({"val_miou": 60.0}, {"val_miou": 41.0})
    assert "fell from 60.00 to 41.00" in message and "train_fusion.collapse_drop" in message
    assert collapse_guard(0.0)({"val_miou": 60.0}, {"val_miou": 1.0}) is None


def test_padding_is_left_out_of_the_loss_when_asked():
    from smaf.losses import self_training_loss

    torch.manual_seed(0)
    cam, target = torch.randn(2, 4, 8, 8), torch.rand(2, 4, 16, 16)
    ones = torch.ones(2, 16, 16)
    torch.testing.assert_close(self_training_loss(cam, target, 100.0, valid=ones), self_training_loss(cam, target))
    valid = torch.zeros(2, 16, 16)
    valid[:, :, :10] = 1.0
    changed = target.clone()
    changed[:, :, :, 10:] = torch.rand(2, 4, 16, 6)           # only padding pixels change
    assert self_training_loss(cam, changed, valid=valid) == self_training_loss(cam, target, valid=valid)
    assert self_training_loss(cam, changed) != self_training_loss(cam, target)


class _ScaledHead(torch.nn.Module):
    """Fixed C+1 logit maps times a logit scale (the part of CAMNet that ``calibration: scale_all`` touches)."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.num_classes, self.logit_scale = logits, logits.shape[1] - 1, 1.0

    def set_logit_scale(self, value):
        self.logit_scale = value

    def forward(self, images):
        cam = self.logits * self.logit_scale
        return cam.mean((2, 3)), cam, None


def test_scale_all_puts_the_labelled_peaks_near_one_and_keeps_every_argmax():
    from smaf.stages.train_fusion import calibrate_logit_scale

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 6) * 5
    logits[0, 0, 2, 2], logits[1, 1, 3, 3] = 30.0, 40.0     # labelled peaks: mean 35, as an EPS head's (~31)
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    model = _ScaledHead(logits.clone())
    divisor = calibrate_logit_scale(model, None, labels)
    assert divisor == pytest.approx(35.0)
    _, cam, _ = model(None)
    assert torch.equal(cam.argmax(1), logits.argmax(1))
    assert float(cam[0, 0].max() + cam[1, 1].max()) / 2 == pytest.approx(1.0)
    # the softmax is no longer saturated where it was
    assert float(torch.softmax(cam, 1).amax(1).max()) < float(torch.softmax(logits, 1).amax(1).max())
