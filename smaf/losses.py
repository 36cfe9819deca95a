"""Losses of stage 0 (classification, EPS saliency) and stage 2 (self-training target and loss)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def multilabel_soft_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits over classes and batch. logits, labels: (B, C)."""
    return F.multilabel_soft_margin_loss(logits.float(), labels.float())


def eps_saliency_loss(cam: torch.Tensor, saliency: torch.Tensor, labels: torch.Tensor, tau: float = 0.4,
                      lam: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """EPS saliency loss (related-methods §5).

    Args:
        cam: (B, C+1, h, w) raw CAM, background last.
        saliency: (B, 1, H, W) saliency in [0, 1]; resized to (h, w) with nearest interpolation.
        labels: (B, C) image-level labels.
        tau: overlap threshold deciding whether a labelled class counts as foreground.
        lam: weight of the foreground term in the predicted saliency.

    Per image: p = softmax(cam); O_c = sum(round(p_c) round(S)) / (sum(round(p_c)) + 1e-4); the foreground
    set is {labelled c with O_c > tau}, the background set {bg} + {labelled c with O_c <= tau};
    S_hat = lam * sum_fg p + (1 - lam) * (1 - sum_bg p); loss = mean((S_hat - S)^2).

    Returns (loss scalar, S_hat (B, 1, h, w)).
    """
    b, k, h, w = cam.shape
    c = k - 1
    p = torch.softmax(cam.float(), dim=1)
    sal = F.interpolate(saliency.float(), size=(h, w), mode="nearest")
    with torch.no_grad():
        p_round = torch.round(p[:, :c])
        s_round = torch.round(sal)
        overlap = (p_round * s_round).sum((2, 3)) / (p_round.sum((2, 3)) + 1e-4)       # (B, C)
        present = labels > 0.5
        fg_sel = (present & (overlap > tau)).float()                                   # (B, C)
        bg_sel = (present & (overlap <= tau)).float()
    m_fg = (p[:, :c] * fg_sel[:, :, None, None]).sum(1, keepdim=True)
    m_bg = (p[:, :c] * bg_sel[:, :, None, None]).sum(1, keepdim=True) + p[:, c:]
    s_hat = lam * m_fg + (1 - lam) * (1 - m_bg)
    return F.mse_loss(s_hat, sal), s_hat


def self_training_target(fused: torch.Tensor, labels: torch.Tensor, bg_score=0.2,
                         weights: torch.Tensor | None = None, bg_weight: torch.Tensor | None = None) -> torch.Tensor:
    """SMAF stage-2 target (denoising + reactivation).

    Args:
        fused: (B, C, h, w) fused maps M at target resolution.
        labels: (B, C) image-level labels.
        bg_score: the background score: a constant, or a (B,) tensor (one per image, e.g. each image's Otsu
            threshold of its whole fused map, so that the target's partition is the mask rule's).
        weights: optional (B, C, h, w) denoising weights of the foreground channels.
        bg_weight: optional (B, 1, h, w) denoising weight of the background channel.

    Returns T (B, C+1, h, w): [M * y (* w); bg (* w_bg)] divided per pixel by its channel maximum, so the winning
    class becomes 1 and the others keep their relative strength (the maximum is never 0: bg > 0).
    """
    fg = fused * labels[:, :, None, None]
    if weights is not None:
        fg = fg * weights
    bg_value = torch.as_tensor(bg_score, dtype=fg.dtype, device=fg.device).reshape(-1, 1, 1, 1)
    bg = bg_value.expand(fg.shape[0], 1, *fg.shape[2:])
    if bg_weight is not None:
        bg = bg * bg_weight
    target = torch.cat([fg, bg], 1)
    return target / target.amax(1, keepdim=True).clamp(min=1e-12)


def self_training_loss(student_cam: torch.Tensor, target: torch.Tensor, weight: float = 100.0,
                       align_corners: bool = False, valid: torch.Tensor | None = None) -> torch.Tensor:
    """weight x MSE(softmax(student cam bilinearly resized to the target size), target).

    student_cam: (B, C+1, h, w); target: (B, C+1, H, W); ``align_corners`` of the resize (the reference: True);
    ``valid``: optional (B, H, W) pixel weights in [0, 1] (the fraction of image, not crop padding, under each
    target pixel): the squared error is then averaged over the weighted pixels only, so padding teaches nothing.
    With ``valid`` all ones this equals the plain mean over every pixel."""
    cam = F.interpolate(student_cam.float(), size=target.shape[-2:], mode="bilinear", align_corners=align_corners)
    if valid is None:
        return weight * F.mse_loss(torch.softmax(cam, 1), target)
    err = (torch.softmax(cam, 1) - target).pow(2).mean(1)
    return weight * (err * valid).sum() / valid.sum().clamp(min=1e-6)


def prototype_similarity(feature: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every pixel feature to every prototype.
    feature: (B, D, h, w); prototypes: (K, D). Returns (B, K, h, w) in [-1, 1]."""
    f = F.normalize(feature.float(), dim=1)
    p = F.normalize(prototypes.float(), dim=1)
    return torch.einsum("bdhw,kd->bkhw", f, p)


def prototype_weights(feature: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """The reference's denoising weights ReLU(cosine(f, prototype_k)) per pixel (``denoise_rule: reference``).
    feature: (B, D, h, w); prototypes: (K, D). Returns (B, K, h, w)."""
    return F.relu(prototype_similarity(feature, prototypes))


def softmax_prototype_weights(similarity: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """ProDA-style denoising weights over the image's labelled classes and the background together.

    Args:
        similarity: (B, C+1, h, w) cosine similarities to the C class prototypes and the background one (last).
        labels: (B, C) image-level labels (unlabelled classes get weight 0).
        temperature: softmax temperature (> 0).

    Returns (B, C+1, h, w): per pixel, softmax over {labelled classes, background} of similarity / temperature
    (0 elsewhere), rescaled so that their mean is 1. A uniform shift of the similarities cancels, and equal
    prototypes give weight 1 everywhere, i.e. no change to the target.
    """
    keep = torch.cat([labels > 0.5, torch.ones_like(labels[:, :1], dtype=torch.bool)], 1)[:, :, None, None]
    logits = (similarity / float(temperature)).masked_fill(~keep, float("-inf"))
    weights = torch.softmax(logits, dim=1)
    return weights * keep.sum(1, keepdim=True).to(weights.dtype)


def scale_matched_temperature(similarity: torch.Tensor, labels: torch.Tensor) -> float:
    """A temperature on the scale of the similarities themselves: the mean over pixels of the spread
    (max - min) of the cosine similarities among each image's labelled classes and the background, so that
    the softmax of :func:`softmax_prototype_weights` is neither uniform nor one-hot. ``similarity``:
    (B, C+1, h, w); ``labels``: (B, C). No ground truth involved."""
    keep = torch.cat([labels > 0.5, torch.ones_like(labels[:, :1], dtype=torch.bool)], 1)[:, :, None, None]
    big = torch.finfo(similarity.dtype).max
    hi = similarity.masked_fill(~keep, -big).amax(1)
    lo = similarity.masked_fill(~keep, big).amin(1)
    return max(float((hi - lo).mean()), 1e-3)


# --------------------------------------------------------------------------- SEAM (related-methods.md §3)
SEAM_EPS = 1e-5


def min_max_normalize(cam: torch.Tensor) -> torch.Tensor:
    """SEAM's CAM normalisation per image and channel over the pixels: ReLU(p - min - 1e-5) / (max - min + 1e-5).
    cam (B, K, h, w) -> (B, K, h, w) in [0, 1)."""
    cam = cam.float()
    lo = cam.amin((2, 3), keepdim=True)
    hi = cam.amax((2, 3), keepdim=True)
    return F.relu(cam - lo - SEAM_EPS) / (hi - lo + SEAM_EPS)


def adaptive_min_pooling_loss(cam_rv_fg: torch.Tensor, fraction: float = 0.25) -> torch.Tensor:
    """SEAM's adaptive min-pooling loss: per pixel the maximum over the channels of ``cam_rv_fg`` (B, C, h, w),
    the PCM output's foreground channels multiplied by the labels; then the mean of ReLU over the lowest
    ``k = int(h w fraction)`` pixels of every image (sum over the batch / (k B)). Pushes the weakest pixels of
    every image to 0."""
    b = cam_rv_fg.shape[0]
    peak = cam_rv_fg.float().amax(1).flatten(1)                     # (B, hw)
    k = max(1, int(peak.shape[1] * float(fraction)))
    lowest = torch.topk(peak, k, dim=1, largest=False).values
    return F.relu(lowest).sum() / (k * b)


def seam_consistency_losses(cam1: torch.Tensor, cam_rv1: torch.Tensor, cam2: torch.Tensor, cam_rv2: torch.Tensor,
                            labels_ext: torch.Tensor, top_fraction: float = 0.2,
                            onehot_bg_index: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """SEAM's equivariant regularisation (ER) and equivariant cross regularisation (ECR) between two views.

    Args:
        cam1, cam_rv1: (B, K, H1, W1) raw CAM and PCM output of view 1 (K = C+1, background LAST; the CAM's
            background channel is ignored: it is replaced by 1 - the foreground maximum).
        cam2, cam_rv2: (B, K, H2, W2) the same of view 2 (view 1 rescaled).
        labels_ext: (B, K) image labels with the background label 1 (last).
        top_fraction: ECR averages the largest ``int(K H2 W2 top_fraction)`` errors of every image.
        onehot_bg_index: the channel the ECR target's "keep the maximum foreground" leaves alone: -1 = the
            background (correct); 0 reproduces PPC's ``esp`` branch, whose ``max_onehot`` assumes background first.

    Every map is normalised by :func:`min_max_normalize` and multiplied by the labels; view 1 is resized to
    (H2, W2) (bilinear, align_corners=True). ER = mean |cam1 - cam2| over the foreground channels. Then the
    background of cam1 and cam2 is set to 1 - their foreground maximum, and ECR = mean over images of the mean of
    the top errors of |keep_max(cam2).detach - cam_rv1|, plus the same with the views swapped
    (keep_max = :func:`smaf.models.pcm.keep_max_foreground`). Returns (ER, ECR) scalars.
    """
    from .models.pcm import keep_max_foreground

    size = cam2.shape[-2:]
    y = labels_ext.float()[:, :, None, None]

    def view1(x):
        return F.interpolate(min_max_normalize(x), size=size, mode="bilinear", align_corners=True) * y

    c1, rv1 = view1(cam1), view1(cam_rv1)
    c2, rv2 = min_max_normalize(cam2) * y, min_max_normalize(cam_rv2) * y
    loss_er = (c1[:, :-1] - c2[:, :-1]).abs().mean()
    c1 = torch.cat([c1[:, :-1], 1 - c1[:, :-1].amax(1, keepdim=True)], 1)
    c2 = torch.cat([c2[:, :-1], 1 - c2[:, :-1].amax(1, keepdim=True)], 1)
    b, k, h, w = c2.shape
    top = max(1, int(k * h * w * float(top_fraction)))

    def ecr(target, rv):
        err = (keep_max_foreground(target.detach(), onehot_bg_index) - rv).abs().view(b, -1)
        return torch.topk(err, top, dim=1).values.mean()

    return loss_er, ecr(c2, rv1) + ecr(c1, rv2)


# --------------------------------------------------------------------------- PPC (related-methods.md §4)
def ppc_pseudo_labels_and_scores(cam_rv: torch.Tensor, labels_ext: torch.Tensor, bg_score: float,
                                 bg_index: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """PPC's pixel pseudo-labels and prototype scores from the PCM output (no gradient).

    cam_rv: (B, K, h, w) (K = C+1); labels_ext: (B, K) with the background label 1; ``bg_score``: the constant
    of the background channel; ``bg_index``: its channel (-1 = last). The scores are ReLU(cam_rv) min-max
    normalised per image and channel (:func:`min_max_normalize`) with the background channel set to
    ``bg_score`` (for every class, present or not: absent classes still get prototypes, used as negatives).
    Returns (pseudo-labels (B, h, w) long = argmax of scores x labels, scores (B, K, h, w))."""
    with torch.no_grad():
        scores = min_max_normalize(F.relu(cam_rv.float()))
        scores[:, bg_index] = float(bg_score)
        labels = (scores * labels_ext.float()[:, :, None, None]).argmax(1)
    return labels, scores


def ppc_prototypes(features: torch.Tensor, scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """PPC's class prototypes of one view (no gradient): for every channel k of ``scores`` (B, K, h, w), the
    ``top_k`` pixels of the whole batch with the highest score; the prototype is the score-weighted mean of their
    ``features`` (B, D, h, w) (detached), L2-normalised. Returns (K, D)."""
    with torch.no_grad():
        k, d = scores.shape[1], features.shape[1]
        flat_scores = scores.transpose(0, 1).reshape(k, -1)                     # (K, B h w)
        flat_feat = features.detach().float().permute(0, 2, 3, 1).reshape(-1, d)  # (B h w, D)
        values, index = torch.topk(flat_scores, min(int(top_k), flat_scores.shape[1]), dim=1)
        protos = (values[:, :, None] * flat_feat[index]).sum(1) / values.sum(1, keepdim=True).clamp(min=1e-12)
        return F.normalize(protos, dim=1)


def prototype_nce(z: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor,
                  temperature: float = 0.1) -> torch.Tensor:
    """InfoNCE of every pixel against all prototypes, the positive in the denominator:
    mean over pixels of -log softmax(z . P^T / temperature)[label]. z: (B, D, h, w) (L2-normalised here);
    labels: (B, h, w) long in 0..K-1; prototypes: (K, D) unit vectors."""
    zf = F.normalize(z.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    logits = zf @ prototypes.t() / float(temperature)
    return F.cross_entropy(logits, labels.reshape(-1))


def ppc_intra_view_loss(z: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor, temperature: float = 0.1,
                        skip_hardest_negatives: int = 3, top_negatives: int = 13,
                        random_fraction: float = 0.5, hard_band: tuple[float, float] = (0.1, 0.6),
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """PPC's intra-view contrast with semi-hard prototype mining and hard pixel sampling.

    Args:
        z: (B, D, h, w) projected features (L2-normalised here); labels: (B, h, w) pseudo-labels in 0..K-1;
        prototypes: (K, D) unit vectors of the same view.
        skip_hardest_negatives, top_negatives: the denominator holds the positive and the negatives ranked
            ``skip+1 .. top`` by similarity (4..13 in PPC). With fewer negatives than ``skip + 1`` (sets of under
            four classes) all negatives are used, so the term does not vanish.
        random_fraction: per class, ``int(n random_fraction)`` of its n pixels drawn at random, plus the pixels
            ranked ``[int(n band[0]), int(n band[1]))`` by ascending similarity (cos + 1) / 2 to their prototype
            (the hardest 10% skipped); duplicates count twice.

    Returns the mean over the classes present of the mean loss over their selected pixels (0 when no pixel).
    """
    d = z.shape[1]
    zf = F.normalize(z.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, d)
    flat = labels.reshape(-1)
    per_class = []
    for cls in torch.unique(flat).tolist():
        idx = (flat == cls).nonzero(as_tuple=True)[0]
        n = idx.numel()
        with torch.no_grad():
            sim = (zf[idx] @ prototypes[cls] + 1) / 2
            order = torch.argsort(sim)
            hard = order[int(n * hard_band[0]):int(n * hard_band[1])]
            rand = torch.randperm(n, generator=generator, device="cpu")[:int(n * random_fraction)].to(idx.device)
        chosen = idx[torch.cat([rand, hard])]
        if chosen.numel() == 0:
            continue
        logits = zf[chosen] @ prototypes.t() / float(temperature)               # (m, K)
        pos = logits[:, cls]
        neg = torch.cat([logits[:, :cls], logits[:, cls + 1:]], 1)
        ranked = torch.sort(neg, dim=1, descending=True).values
        mined = ranked[:, skip_hardest_negatives:top_negatives]
        if mined.shape[1] == 0:
            mined = ranked
        denom = torch.logsumexp(torch.cat([pos[:, None], mined], 1), dim=1)
        per_class.append((denom - pos).mean())
    if not per_class:
        return z.sum() * 0.0
    return torch.stack(per_class).mean()


# --------------------------------------------------------------------------- SC-CAM (related-methods.md §6)
def subcategory_targets(cluster_ids: dict, num_images: int, num_classes: int, num_subcategories: int) -> torch.Tensor:
    """SC-CAM's multi-hot sub-category labels from per-class cluster assignments.

    ``cluster_ids``: {class c: (image indices (n_c,), cluster ids (n_c,) in 0..K-1)}: the k-means of class c over
    the images labelled c. Returns (num_images, C K) float32 with bit c K + cluster set for every (image, class)
    pair, so an image with several classes has one bit per class."""
    out = torch.zeros(num_images, num_classes * num_subcategories)
    for cls, (images, clusters) in cluster_ids.items():
        images = torch.as_tensor(images, dtype=torch.long)
        clusters = torch.as_tensor(clusters, dtype=torch.long)
        if clusters.numel() and (clusters.min() < 0 or clusters.max() >= num_subcategories):
            raise ValueError(f"class {cls}: cluster ids must lie in 0..{num_subcategories - 1}")
        out[images, int(cls) * num_subcategories + clusters] = 1.0
    return out


def sc_cam_loss(logits: torch.Tensor, labels: torch.Tensor, sub_logits: torch.Tensor, sub_labels: torch.Tensor,
                weight: float = 5.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SC-CAM: MLSM(parent logits (B, C), labels (B, C)) + weight x MLSM(sub-category logits (B, C K),
    sub-category labels (B, C K)). Returns (total, parent term, sub-category term)."""
    parent = multilabel_soft_margin(logits, labels)
    sub = multilabel_soft_margin(sub_logits, sub_labels)
    return parent + float(weight) * sub, parent, sub


def afa_affinity_loss(affinity: torch.Tensor, pair_labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """AFA's affinity loss (related-methods.md §7 step 5), linear, not BCE: ½ mean over the positive pairs of
    (1 - a) + ½ mean over the negative pairs of a. affinity (B, N, N) in [0, 1]; pair_labels (B, N, N) 1 / 0 /
    255 (ignored). An empty set contributes 0. Returns (loss, {'aff_pos': count, 'aff_neg': count})."""
    a = affinity.float()
    pos = (pair_labels == 1).to(a.dtype)
    neg = (pair_labels == 0).to(a.dtype)
    n_pos, n_neg = pos.sum(), neg.sum()
    loss = 0.5 * (pos * (1.0 - a)).sum() / n_pos.clamp(min=1.0) + 0.5 * (neg * a).sum() / n_neg.clamp(min=1.0)
    return loss, {"aff_pos": float(n_pos), "aff_neg": float(n_neg)}


def background_foreground_ce(logits: torch.Tensor, label: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """AFA's segmentation loss (§7 step 7): ½ cross-entropy over the background pixels (label 0) + ½ over the
    foreground pixels (1..K-1), ``ignore_index`` left out. logits (B, K, h, w) are upsampled bilinearly to the
    label size (B, H, W); an empty part contributes 0."""
    if tuple(logits.shape[-2:]) != tuple(label.shape[-2:]):
        logits = F.interpolate(logits, size=tuple(label.shape[-2:]), mode="bilinear", align_corners=False)
    label = label.long()
    valid = label != ignore_index
    per_pixel = F.cross_entropy(logits.float(), torch.where(valid, label, torch.zeros_like(label)),
                                reduction="none")
    loss = per_pixel.sum() * 0.0
    for part in (valid & (label == 0), valid & (label > 0)):
        count = part.sum()
        if int(count):
            loss = loss + 0.5 * (per_pixel * part).sum() / count
    return loss
