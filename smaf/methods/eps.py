"""``eps``: EPS (Lee et al., CVPR 2021): multilabel soft margin on the C foreground logits + the saliency loss
(``opts``: tau, lam; :func:`smaf.losses.eps_saliency_loss`) on a C+1 head, background last."""
from __future__ import annotations

from ..losses import eps_saliency_loss, multilabel_soft_margin
from . import ClassifierMethod, register_method


@register_method
class EPS(ClassifierMethod):
    name = "eps"
    head = "smaf"
    needs_saliency = True

    def loss(self, outputs, batch, labels, opts, num_classes, device):
        logits, cam, _ = outputs
        loss_cls = multilabel_soft_margin(logits[:, :num_classes], labels)
        saliency = batch["saliency"].to(device, non_blocking=True)
        loss_sal, _ = eps_saliency_loss(cam, saliency, labels, tau=float(opts.tau), lam=float(opts.lam))
        return loss_cls + loss_sal, {"cls": float(loss_cls.detach()), "sal": float(loss_sal.detach())}
