"""Class prototypes: the mean feature f of each class (background last), made by stage 1 and moved by stage 2.

Stage 1 writes, per image, the mean feature of each class its PNG assigns (``proto_stats/<id>.npy``, see
:func:`class_feature_means`) and averages them over images (:func:`aggregate_prototypes`) into
``prototypes.pt`` (:func:`save_prototypes`); stage 2 keeps them as a :class:`PrototypeBank` that follows
the EMA teacher.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..io import atomic_save, load_cam_dict
from ..run_layout import PROTO_STATS


def class_feature_means(feature: torch.Tensor, label: torch.Tensor, num_classes: int,
                        min_pixels: int = 10) -> dict:
    """Per-class mean feature of one image for prototypes.

    Args:
        feature: (D, h, w) feature f at feature resolution.
        label: (H, W) uint8 VOC label map at image resolution (nearest-downsampled to h x w here).
        num_classes: C; background (label 0) becomes prototype index C (background last, as the network).
        min_pixels: classes with fewer assigned feature pixels are skipped.

    Returns ``{prototype index: float32 (D,) CPU tensor}``.
    """
    d, h, w = feature.shape
    small = F.interpolate(label[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    flat_f = feature.reshape(d, -1)
    flat_l = small.flatten()
    out = {}
    for value in torch.unique(flat_l).tolist():
        if value == 255:
            continue
        mask = flat_l == value
        if int(mask.sum()) < min_pixels:
            continue
        index = num_classes if value == 0 else value - 1
        out[index] = flat_f[:, mask].mean(1).float().cpu()
    return out


def aggregate_prototypes(out_dir: Path, ids: list, num_classes: int, feat_dim: int) -> tuple:
    """Prototype k = mean over images of the image's mean feature over pixels assigned to k
    (``proto_stats/<id>.npy``). Returns ((C+1, D) float32 tensor, (C+1,) image counts)."""
    sums = torch.zeros(num_classes + 1, feat_dim, dtype=torch.float64)
    counts = torch.zeros(num_classes + 1, dtype=torch.long)
    for image_id in ids:
        for k, v in load_cam_dict(out_dir / PROTO_STATS / f"{image_id}.npy").items():
            sums[k] += torch.from_numpy(v).double()
            counts[k] += 1
    protos = (sums / counts.clamp(min=1).unsqueeze(1)).float()
    return protos, counts


class PrototypeBank:
    """(C+1, D) class prototypes (background last) with a momentum update from teacher outputs."""

    def __init__(self, prototypes: torch.Tensor, momentum: float, min_pixels: int = 10):
        self.prototypes = prototypes.float().clone()
        self.momentum, self.min_pixels = momentum, min_pixels

    def state_dict(self) -> dict:
        return {"prototypes": self.prototypes.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.prototypes = state["prototypes"].to(self.prototypes.device)

    @torch.no_grad()
    def batch_class_means(self, cam: torch.Tensor, feature: torch.Tensor, labels: torch.Tensor):
        """Sum over images of each image's mean feature per assigned class, and the image counts.

        cam: (B, C+1, h, w) teacher CAM; feature: (B, D, h, w); labels: (B, C). A pixel is assigned to
        argmax over [softmax fg x labels; softmax bg]; classes with < min_pixels pixels in an image are
        skipped. Returns (sums (C+1, D), counts (C+1,))."""
        b, k, h, w = cam.shape
        p = torch.softmax(cam.float(), 1)
        scores = torch.cat([p[:, :-1] * labels[:, :, None, None], p[:, -1:]], 1)
        onehot = F.one_hot(scores.argmax(1), k).permute(0, 3, 1, 2).float()           # (B, K, h, w)
        pixels = onehot.sum((2, 3))                                                   # (B, K)
        means = torch.einsum("bkhw,bdhw->bkd", onehot, feature.float()) / pixels.clamp(min=1)[..., None]
        keep = (pixels >= self.min_pixels).float()
        return (means * keep[..., None]).sum(0), keep.sum(0)

    @torch.no_grad()
    def update(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """prototype_k <- (1 - m) prototype_k + m mean_k for classes seen in the (global) batch."""
        seen = counts > 0
        batch_mean = sums[seen] / counts[seen, None]
        self.prototypes[seen] = (1 - self.momentum) * self.prototypes[seen] + self.momentum * batch_mean


def save_prototypes(path: Path, prototypes: torch.Tensor, counts: torch.Tensor, class_names: list,
                    min_pixels: int) -> Path:
    """Write ``prototypes.pt``: ``{'prototypes': (C+1, D), 'image_counts': (C+1,), 'class_names': C names +
    'background', 'min_pixels'}`` (the minimum pixel count they were made with, which stage 2's updates use)."""
    payload = {"prototypes": prototypes, "image_counts": counts, "class_names": list(class_names) + ["background"],
               "min_pixels": int(min_pixels)}
    return atomic_save(path, lambda tmp: torch.save(payload, tmp))


def load_prototypes(path: Path) -> dict:
    """Read ``prototypes.pt`` (weights-only, tensors on the CPU); files written before ``min_pixels`` was stored
    get the stage-1 default 10. A file that is not a prototypes payload is a ValueError in one line."""
    from ..safe_load import SafeLoadError, torch_load

    try:
        payload = torch_load(path, "prototypes file")
    except SafeLoadError as err:
        raise ValueError(f"{err}; re-run stage 1 (bash script/gen_fusion.sh)") from None
    protos = payload.get("prototypes") if isinstance(payload, dict) else None
    if not isinstance(protos, torch.Tensor) or protos.dim() != 2:
        raise ValueError(f"'{path}' is not a prototypes file (a dict with a (C+1, D) 'prototypes' tensor); re-run "
                         f"stage 1 (bash script/gen_fusion.sh)")
    payload.setdefault("min_pixels", 10)
    return payload
