"""``seam``: SEAM (Wang et al., CVPR 2020; related-methods.md §3): a plain CAM classifier (C outputs) with SEAM's
pixel correlation module (PCM, :mod:`smaf.models.pcm`) trained on two views of every crop.

Per batch, view 1 = the training crop (B, 3, H, W) and view 2 = the same crop rescaled by ``view2_scale`` (0.3,
bilinear, align_corners=True). Both pass through the network; cam (+ a background channel 1 - max foreground,
last) and the PCM output cam_rv (B, C+1, h, w) are upsampled to their view's input size (bilinear,
align_corners=True). With y the labels and y_ext = [y, 1]:

    L = L_cls + L_minpool + L_ER + L_ECR
    L_cls     = mean over the views of MLSM(logits[:C], y)
    L_minpool = mean over the views of :func:`~smaf.losses.adaptive_min_pooling_loss` (cam_rv[:C] y, 25%)
    L_ER, L_ECR = :func:`~smaf.losses.seam_consistency_losses` (view 1 resized to view 2; ECR top 20%)

The PCM sees the backbone levels detached and its input CAM without gradient, so only its own convs learn from
L_minpool and L_ECR; the CAM head learns from L_cls and L_ER. Stage 1 uses the CAM (ReLU of the C channels),
as for ``cam``. :class:`TwoViewPCMMethod` holds the two-view step that ``ppc`` (:mod:`smaf.methods.ppc`) extends.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import (adaptive_min_pooling_loss, eps_saliency_loss, multilabel_soft_margin,
                      seam_consistency_losses)
from . import ClassifierMethod, check_range, register_method


def with_background_channel(cam: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C+1, h, w) with a zero background channel last; a (B, C+1, h, w) CAM unchanged.
    (The consistency losses replace that channel by 1 - the foreground maximum.)"""
    if cam.shape[1] == num_classes + 1:
        return cam
    return torch.cat([cam, torch.zeros_like(cam[:, :1])], 1)


def upsample_to(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear (align_corners=True, as SEAM) resize of (B, K, h, w) to ``size``."""
    return F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=True)


class TwoViewPCMMethod(ClassifierMethod):
    """The two-view step of SEAM and PPC: view 2 (:meth:`second_view`) of every crop, both views through the
    network with its auxiliary outputs, then :meth:`two_view_loss`."""

    head = "cls"

    def aux_heads(self, opts) -> dict:
        return {"pcm": True}

    def second_view(self, images: torch.Tensor, opts) -> torch.Tensor:
        """images (B, 3, H, W) -> view 2 (B, 3, H', W'): rescaled by ``opts.view2_scale``."""
        return F.interpolate(images, scale_factor=float(opts.view2_scale), mode="bilinear", align_corners=True,
                             recompute_scale_factor=False)

    def make_step(self, opts, num_classes: int, device):
        self.check_options(opts, f"train_cls.{self.name}")

        def step(model, batch, iteration):
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            small = self.second_view(images, opts)
            views = (model(images, aux=True), model(small, aux=True))
            return self.two_view_loss(views, (images, small), batch, labels, opts, num_classes, device)

        return step

    def check_options(self, opts, section: str) -> None:
        check_range(opts, section, "minpool_fraction", 0.0, 1.0)
        check_range(opts, section, "ecr_top_fraction", 0.0, 1.0)
        if "view2_scale" in opts:
            check_range(opts, section, "view2_scale", 0.0, 1.0, high_open=True)

    def seam_terms(self, views, inputs, labels, opts, num_classes: int) -> tuple[torch.Tensor, dict]:
        """SEAM's L_cls + L_minpool + L_ER + L_ECR (module docstring). ``views``: the two ``forward(aux=True)``
        outputs; ``inputs``: the two input batches (their sizes are the upsampling targets)."""
        y_ext = torch.cat([labels, torch.ones_like(labels[:, :1])], 1)
        cams, rvs, loss_cls, loss_min = [], [], 0.0, 0.0
        for (logits, cam, _, aux), x in zip(views, inputs):
            size = x.shape[-2:]
            cam_up = upsample_to(with_background_channel(cam, num_classes), size)
            rv_up = upsample_to(aux["cam_rv"], size)
            loss_cls = loss_cls + multilabel_soft_margin(logits[:, :num_classes], labels) / 2
            loss_min = loss_min + adaptive_min_pooling_loss(rv_up[:, :num_classes] * labels[:, :, None, None],
                                                            float(opts.minpool_fraction)) / 2
            cams.append(cam_up)
            rvs.append(rv_up)
        loss_er, loss_ecr = seam_consistency_losses(cams[0], rvs[0], cams[1], rvs[1], y_ext,
                                                    float(opts.ecr_top_fraction), self.onehot_bg_index(opts))
        total = loss_cls + loss_min + loss_er + loss_ecr
        return total, {"cls": float(loss_cls.detach()), "minpool": float(loss_min.detach()),
                       "er": float(loss_er.detach()), "ecr": float(loss_ecr.detach())}

    def saliency_terms(self, views, batch, labels, opts, device) -> tuple[torch.Tensor, dict]:
        """EPS's saliency loss (tau, lam) on cam and cam_rv of both views, averaged over the views (PPC's ``esp``
        branch); needs the C+1 head."""
        saliency = batch["saliency"].to(device, non_blocking=True)
        total = 0.0
        for _, cam, _, aux in views:
            for maps in (cam, aux["cam_rv"]):
                loss, _ = eps_saliency_loss(maps, saliency, labels, tau=float(opts.tau), lam=float(opts.lam))
                total = total + loss / len(views)
        return total, {"sal": float(total.detach())}

    def onehot_bg_index(self, opts) -> int:
        """The channel the ECR target leaves alone (-1: the background, last)."""
        return -1

    def two_view_loss(self, views, inputs, batch, labels, opts, num_classes: int, device):
        return self.seam_terms(views, inputs, labels, opts, num_classes)


@register_method
class SEAM(TwoViewPCMMethod):
    name = "seam"
    head = "cls"
