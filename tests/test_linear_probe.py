"""The linear-probe tool (smaf.tools.linear_probe): pooled features are the exact spatial mean (plus the cls token
when a backbone gives one), the logistic fit separates separable data, and the CV picks its L2 on train only."""
from __future__ import annotations

import numpy as np
import torch

from smaf.tools import linear_probe as lp


class FakeBackbone(torch.nn.Module):
    """conv6 = the input itself (3 channels), cls_token = the per-channel maximum, when ``with_cls``."""

    def __init__(self, with_cls: bool):
        super().__init__()
        self.with_cls = with_cls

    def forward(self, x):
        out = {"conv6": x}
        if self.with_cls:
            out["cls_token"] = x.amax(dim=(2, 3))
        return out


class FakeLayout:
    def __init__(self, images):
        self.images = images

    def load_image(self, image_id):
        return self.images[image_id]


def test_pooled_features_are_the_spatial_mean_and_the_cls_token_when_given():
    rng = np.random.default_rng(0)
    images = {"a": rng.integers(0, 256, (20, 30, 3), dtype=np.uint8),
              "b": rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)}
    layout = FakeLayout(images)
    plain = lp.pooled_features(FakeBackbone(False), layout, ["a", "b"], long_side=30)
    assert sorted(plain) == ["mean"] and plain["mean"].shape == (2, 3)
    with_cls = lp.pooled_features(FakeBackbone(True), layout, ["a", "b"], long_side=30)
    assert sorted(with_cls) == ["cls", "mean"]
    for row, image_id in enumerate(["a", "b"]):   # long side already 30: no resize, only normalisation
        normed = torch.from_numpy(lp.normalize(images[image_id]))
        np.testing.assert_allclose(with_cls["mean"][row], normed.mean(dim=(1, 2)).numpy(), atol=1e-6)
        np.testing.assert_allclose(with_cls["cls"][row], normed.amax(dim=(1, 2)).numpy(), atol=1e-6)


def test_the_logistic_fit_separates_two_separable_clusters_and_the_cv_scores_them_perfectly():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20, 4, generator=g) - 3, torch.randn(20, 4, generator=g) + 3])
    y = torch.cat([torch.zeros(20, dtype=torch.long), torch.ones(20, dtype=torch.long)])
    linear = lp.fit_logistic(x, y, l2=1e-3, multilabel=False)
    assert lp.score(linear, x, y, multilabel=False) == 1.0
    l2, cv = lp.cross_validated_l2(x, y, multilabel=False)
    assert l2 in lp.L2_GRID and cv == 1.0
    flipped = lp.fit_logistic(x, 1 - y, l2=1e-3, multilabel=False)   # the labels, not the data, decide
    assert lp.score(flipped, x, y, multilabel=False) == 0.0
