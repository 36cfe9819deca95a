"""``ppc``: pixel-to-prototype contrast (Du et al., CVPR 2022; related-methods.md §4) on top of ``seam`` (the
master branch, §4.1) or of ``eps`` (branch ``esp``, §4.2), chosen by ``train_cls.ppc.base``.

The network is the base's (``seam``: C outputs; ``eps``: C+1, background last) with the PCM and a projection
head (1x1 conv D -> 128 + ReLU on conv6). View 2 is the crop resized to a fixed ``view2_size`` (128 x 128).

    L = L_base + contrast_weight x (L_cross_prototype + L_cross_pseudo_label + L_intra_view)

* L_base: SEAM's four terms (:mod:`smaf.methods.seam`, both views' CAMs at their input size, view 1 resized to
  view 2 for ER/ECR); with ``base: eps`` also EPS's saliency loss on cam and cam_rv of both views.
* View 1's projected features and cam_rv (feature resolution) are resized to view 2's feature size (h, w).
  Pseudo-labels and prototypes per view (no gradient): :func:`~smaf.losses.ppc_pseudo_labels_and_scores`
  (background constant ``bg_score``) and :func:`~smaf.losses.ppc_prototypes` (top ``h w // topk_divisor`` pixels
  of the batch per class).
* L_cross_prototype = mean(NCE(z1, y1, P2), NCE(z2, y2, P1)); L_cross_pseudo_label = mean(NCE(z1, y2, P1),
  NCE(z2, y1, P2)) (:func:`~smaf.losses.prototype_nce`, temperature 0.1); L_intra_view = mean over the views of
  :func:`~smaf.losses.ppc_intra_view_loss` (semi-hard prototypes ranked 4-13, hard pixel sampling).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import ppc_intra_view_loss, ppc_prototypes, ppc_pseudo_labels_and_scores, prototype_nce
from . import check_choice, check_range, register_method
from .seam import TwoViewPCMMethod, upsample_to

BASES = ("seam", "eps")
BG_PROTOTYPES = ("constant", "complement")


@register_method
class PPC(TwoViewPCMMethod):
    name = "ppc"
    head = "cls"

    def head_for(self, opts) -> str:
        return "smaf" if str(opts.base) == "eps" else "cls"

    def needs_saliency_for(self, opts) -> bool:
        return str(opts.base) == "eps"

    def aux_heads(self, opts) -> dict:
        return {"pcm": True, "projection_dim": int(opts.projection_dim)}

    def second_view(self, images: torch.Tensor, opts) -> torch.Tensor:
        size = int(opts.view2_size)
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=True)

    def check_options(self, opts, section: str) -> None:
        from ..config import ConfigError
        from ..runtime import check_positive

        base = check_choice(opts, section, "base", BASES)
        super().check_options(opts, section)
        check_positive(opts, section, ("view2_size", "projection_dim", "semi_hard_top"), ("semi_hard_skip",))
        if int(opts.semi_hard_skip) >= int(opts.semi_hard_top):
            raise ConfigError(f"{section}.semi_hard_skip={opts.semi_hard_skip!r}: must be below "
                              f"{section}.semi_hard_top={opts.semi_hard_top!r}")
        check_range(opts, section, "temperature", 0.0, float("inf"))
        check_range(opts, section, "contrast_weight", 0.0, float("inf"), low_open=False)
        check_choice(opts, section, "bg_prototype", BG_PROTOTYPES)
        branch = opts.get(base)
        if branch is None:
            raise ConfigError(f"{section}.{base}: missing (the constants of base {base})")
        where = f"{section}.{base}"
        check_range(branch, where, "bg_score", 0.0, 1.0, low_open=False)
        check_positive(branch, where, ("prototype_topk_divisor",))
        if base == "eps":
            check_range(branch, where, "tau", 0.0, 1.0, low_open=False)
            check_range(branch, where, "lam", 0.0, 1.0, low_open=False)
            check_choice(branch, where, "reproduce_onehot_bug", (True, False))

    def onehot_bg_index(self, opts) -> int:
        branch = opts.get(str(opts.base))
        return 0 if str(opts.base) == "eps" and bool(branch.reproduce_onehot_bug) else -1

    def two_view_loss(self, views, inputs, batch, labels, opts, num_classes: int, device):
        branch = opts.get(str(opts.base))
        total, logs = self.seam_terms(views, inputs, labels, opts, num_classes)
        if str(opts.base) == "eps":
            loss_sal, sal_logs = self.saliency_terms(views, batch, labels, branch, device)
            total, logs = total + loss_sal, {**logs, **sal_logs}
        loss_nce, nce_logs = self.contrast_terms(views, labels, opts, branch)
        return total + loss_nce, {**logs, **nce_logs}

    def contrast_terms(self, views, labels, opts, branch) -> tuple[torch.Tensor, dict]:
        """The three contrast terms, weighted (module docstring). Returns (loss, logs)."""
        (_, _, _, aux1), (_, _, _, aux2) = views
        z2, rv2 = aux2["projection"], aux2["cam_rv"]
        size = z2.shape[-2:]
        z1, rv1 = upsample_to(aux1["projection"], size), upsample_to(aux1["cam_rv"], size)
        y_ext = torch.cat([labels, torch.ones_like(labels[:, :1])], 1)
        top_k = max(1, size[0] * size[1] // int(branch.prototype_topk_divisor))
        pseudo, protos = [], []
        for z, rv in ((z1, rv1), (z2, rv2)):
            y, scores = ppc_pseudo_labels_and_scores(rv, y_ext, float(branch.bg_score))
            if str(opts.bg_prototype) == "complement":
                # rank and weight background pixels by 1 - the labelled foreground maximum, not the constant
                fg = scores[:, :-1] * labels[:, :, None, None]
                scores = torch.cat([scores[:, :-1], 1 - fg.amax(1, keepdim=True)], 1)
            pseudo.append(y)
            protos.append(ppc_prototypes(z, scores, top_k))
        (y1, y2), (p1, p2) = pseudo, protos
        tau = float(opts.temperature)
        cross_proto = (prototype_nce(z1, y1, p2, tau) + prototype_nce(z2, y2, p1, tau)) / 2
        cross_pseudo = (prototype_nce(z1, y2, p1, tau) + prototype_nce(z2, y1, p2, tau)) / 2
        skip, top = int(opts.semi_hard_skip), int(opts.semi_hard_top)
        intra = (ppc_intra_view_loss(z1, y1, p1, tau, skip, top) + ppc_intra_view_loss(z2, y2, p2, tau, skip, top)) / 2
        loss = float(opts.contrast_weight) * (cross_proto + cross_pseudo + intra)
        return loss, {"nce_cross_proto": float(cross_proto.detach()), "nce_cross_pseudo": float(cross_pseudo.detach()),
                      "nce_intra": float(intra.detach())}

