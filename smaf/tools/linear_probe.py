"""Linear probe of a backbone's features on a VOC-layout set: how linearly separable the image classes are in its
globally pooled features, with the backbone frozen.

    python -m smaf.tools.linear_probe --root ../shared/data/pets [--backbones vit_s14_focus,efficientnet_lite0]
        [--train-list LIST] [--val-list LIST] [--long-side 224] [--json OUT]

Per backbone (built with ``pretrained='imagenet'``, in eval mode, at its coarsest output stride: 32 for
EfficientNet-Lite0, 14 for the ViT):

1. every image of the train and val lists (default ``ImageSets/Segmentation/{train,val}.txt``) is resized so its
   long side is ``--long-side`` (area interpolation when shrinking, bicubic when enlarging; aspect kept, no crop),
   ImageNet-normalised, and its ``'conv6'`` map is averaged over space: one D-dim feature per image (``mean``);
   the ViT also gives its normed cls token (``cls``), probed as a second row;
2. features are standardised with the train mean / std, and an L2-regularised logistic regression is fitted on
   train (full-batch L-BFGS): softmax over the classes when every image has exactly one label in
   ``cls_labels.npy`` (single-label), one sigmoid per class otherwise (multi-label). The L2 strength is picked
   from :data:`L2_GRID` by 5-fold cross-validation on train only;
3. reported on val: accuracy (single-label) or mean average precision over the classes (multi-label).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..data.transforms import normalize
from ..data.voc import DatasetError, VOCLayout
from ..runtime import available_cores

DEFAULT_BACKBONES = ("vit_s14_focus", "efficientnet_lite0")
DEFAULT_LONG_SIDE = 224
L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
FOLDS = 5
SEED = 0


def resize_long_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> the same image with max(H, W) = ``long_side`` (aspect kept)."""
    h, w = image.shape[:2]
    scale = long_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)


@torch.no_grad()
def pooled_features(backbone: torch.nn.Module, layout: VOCLayout, ids: list[str], long_side: int) -> dict:
    """``{'mean': (N, D)}`` float32: the spatial mean of ``backbone(x)['conv6']`` for each image (one at a time:
    sizes vary), plus ``'cls': (N, D)`` for a backbone that also returns a ``cls_token`` (the ViT)."""
    out: dict = {}
    for image_id in ids:
        image = resize_long_side(layout.load_image(image_id), long_side)
        x = torch.from_numpy(normalize(image)).unsqueeze(0)
        result = backbone(x)
        out.setdefault("mean", []).append(result["conv6"].float().mean(dim=(2, 3))[0].numpy())
        if "cls_token" in result:
            out.setdefault("cls", []).append(result["cls_token"].float()[0].numpy())
    return {k: np.stack(v).astype(np.float32) for k, v in out.items()}


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, multilabel: bool) -> torch.nn.Linear:
    """Logistic regression x (N, D) -> C classes: softmax cross-entropy on class indices y (N,) or, multi-label,
    binary cross-entropy on y (N, C) in {0, 1}; plus ``l2`` * ||W||^2. Full-batch L-BFGS to convergence."""
    num_classes = y.shape[1] if multilabel else int(y.max()) + 1
    linear = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-6,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = linear(x)
        data = F.binary_cross_entropy_with_logits(logits, y) if multilabel else F.cross_entropy(logits, y)
        loss = data + l2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return linear


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """AP of one class: the mean, over its positives, of the precision at each positive's rank (scores sorted
    descending)."""
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(bool)
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def score(linear: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, multilabel: bool) -> float:
    """Accuracy (single-label) or mean AP over the classes with a positive (multi-label)."""
    with torch.no_grad():
        logits = linear(x)
    if not multilabel:
        return float((logits.argmax(1) == y).float().mean())
    aps = [average_precision(logits[:, c].numpy(), y[:, c].numpy()) for c in range(y.shape[1])]
    return float(np.nanmean(aps))


def cross_validated_l2(x: torch.Tensor, y: torch.Tensor, multilabel: bool) -> tuple[float, float]:
    """(the L2 strength of :data:`L2_GRID` with the best mean score over :data:`FOLDS` folds of train, that
    score). Folds are a fixed random split; features are standardised per fold with its training part."""
    folds = np.array_split(np.random.default_rng(SEED).permutation(len(x)), FOLDS)
    best = (L2_GRID[0], -1.0)
    for l2 in L2_GRID:
        scores = []
        for k in range(FOLDS):
            held = torch.from_numpy(folds[k])
            kept = torch.from_numpy(np.concatenate([f for j, f in enumerate(folds) if j != k]))
            mean, std = x[kept].mean(0), x[kept].std(0) + 1e-6
            linear = fit_logistic((x[kept] - mean) / std, y[kept], l2, multilabel)
            scores.append(score(linear, (x[held] - mean) / std, y[held], multilabel))
        if np.mean(scores) > best[1]:
            best = (l2, float(np.mean(scores)))
    return best


def probe(name: str, layout: VOCLayout, train_ids: list[str], val_ids: list[str], long_side: int) -> list[dict]:
    """Extract, fit and score one backbone (module docstring): a row per feature of :func:`pooled_features`
    (the ViT's cls token too), each with its own cross-validated L2. Returns the rows of the report."""
    from ..models import BACKBONE_OUTPUT_STRIDES, build_backbone

    stride = max(BACKBONE_OUTPUT_STRIDES[name])
    backbone = build_backbone(name, "imagenet", stride).eval()
    start = time.perf_counter()
    train_f = pooled_features(backbone, layout, train_ids, long_side)
    val_f = pooled_features(backbone, layout, val_ids, long_side)
    extract_s = time.perf_counter() - start
    train_labels = np.stack([layout.labels[i] for i in train_ids])
    val_labels = np.stack([layout.labels[i] for i in val_ids])
    multilabel = not (np.all(train_labels.sum(1) == 1) and np.all(val_labels.sum(1) == 1))
    if multilabel:
        train_y, val_y = torch.from_numpy(train_labels).float(), torch.from_numpy(val_labels).float()
    else:
        train_y, val_y = torch.from_numpy(train_labels.argmax(1)), torch.from_numpy(val_labels.argmax(1))
    rows = []
    for feature in train_f:
        train_x, val_x = torch.from_numpy(train_f[feature]), torch.from_numpy(val_f[feature])
        l2, cv_score = cross_validated_l2(train_x, train_y, multilabel)
        mean, std = train_x.mean(0), train_x.std(0) + 1e-6
        linear = fit_logistic((train_x - mean) / std, train_y, l2, multilabel)
        val_score = score(linear, (val_x - mean) / std, val_y, multilabel)
        rows.append({"backbone": name, "feature": feature, "output_stride": stride,
                     "feature_dim": int(train_x.shape[1]), "metric": "mean AP" if multilabel else "accuracy",
                     "l2": l2, "train_cv": cv_score, "val": val_score,
                     "val_correct": None if multilabel else int(round(val_score * len(val_ids))),
                     "num_train": len(train_ids), "num_val": len(val_ids), "extract_s": round(extract_s, 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Linear probe (logistic regression on globally pooled features) "
                                                 "of backbones on a VOC-layout set.")
    parser.add_argument("--root", type=Path, required=True, help="dataset root (JPEGImages/, cls_labels.npy)")
    parser.add_argument("--backbones", default=",".join(DEFAULT_BACKBONES),
                        help=f"comma list of smaf.models.BACKBONES names (default {','.join(DEFAULT_BACKBONES)})")
    parser.add_argument("--train-list", type=Path, help="default <root>/ImageSets/Segmentation/train.txt")
    parser.add_argument("--val-list", type=Path, help="default <root>/ImageSets/Segmentation/val.txt")
    parser.add_argument("--long-side", type=int, default=DEFAULT_LONG_SIDE, help="resize long side (default 224)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    from ..models import BACKBONES

    names = [b.strip() for b in args.backbones.split(",") if b.strip()]
    unknown = [b for b in names if b not in BACKBONES]
    if unknown or not names:
        parser.error(f"--backbones: unknown {unknown}; valid: {', '.join(sorted(BACKBONES))}")
    if args.long_side < 32:
        parser.error("--long-side must be at least 32")
    torch.set_num_threads(available_cores())
    try:
        layout = VOCLayout(args.root)
        splits = args.root / "ImageSets" / "Segmentation"
        train_ids = layout.read_list(args.train_list or splits / "train.txt")
        val_ids = layout.read_list(args.val_list or splits / "val.txt")
        rows = [row for name in names for row in probe(name, layout, train_ids, val_ids, args.long_side)]
    except (DatasetError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"linear probe on {args.root} ({len(train_ids)} train / {len(val_ids)} val, long side {args.long_side})")
    print("| backbone | feature | stride | dim | L2 (5-fold CV) | train CV | val | features (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        val = f"{r['metric']} {r['val']:.3f}" + (f" ({r['val_correct']}/{r['num_val']})" if r["val_correct"]
                                                 is not None else "")
        print(f"| {r['backbone']} | {r['feature']} | {r['output_stride']} | {r['feature_dim']} | {r['l2']:g} | {r['train_cv']:.3f} "
              f"| {val} | {r['extract_s']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
