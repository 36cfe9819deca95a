"""``sc_cam``: SC-CAM (Chang et al., CVPR 2020; related-methods.md §6): a plain CAM classifier (C outputs) plus a
sub-category head (C x K outputs, K = 10), retrained in rounds on k-means sub-categories of its own features.

One round r = 1..R (R = ``rounds``, 3):

1. **extract**: for every image of ``data.train_list`` (whole image at scale 1, ``inference.base_long`` /
   ``inference.resize``, eval mode) the global average of the previous round's backbone ``conv6`` (D values);
2. **k-means**: for every class c, scikit-learn ``KMeans(K, random_state=kmeans_seed, max_iter=300,
   n_init=kmeans_n_init)`` over the features of the images labelled c (an image with several classes is in
   several clusterings); a class with fewer than K images gets one cluster per image. The sub-category label is
   the C K multi-hot vector with bit c K + cluster for each of the image's classes
   (:func:`~smaf.losses.subcategory_targets`);
3. **retrain** from ``model.pretrained`` (ImageNet) with L = MLSM(parent logits, y) + 5 MLSM(sub-category
   logits, sub-category labels) (:func:`~smaf.losses.sc_cam_loss`).

Round 0's extractor is ``initial_checkpoint`` (PSA's ``res38_cls.pth`` in the reference), or, when empty, a
plain ``cam`` classifier trained as round 0. Layout under ``<work_dir>/<train_cls.out_subdir>/``::

    round_0/                 the cam classifier (a complete stage-0 folder), unless initial_checkpoint is set
    round_<r>/subcategory_labels.npz   ids, labels (N, C K) uint8, cluster ids (N, C) int (-1: class absent)
    round_<r>/               the round's stage-0 folder (final.pth, checkpoints/, log.txt, ...)
    final.pth                the last round's model: what stage 1 reads, as for every method
    final.json               {"rounds": R, "model": ...}: which round final.pth is (another rounds setting goes on)
    rounds.json              per round: extractor, labels file, model, seconds

A finished round (its final.pth exists) is skipped on rerun; an interrupted one resumes from its own
checkpoints (``train_cls.resume=auto``); a labels file is written atomically, so k-means never half-exists.
Stage 1 uses the parent CAM (ReLU of the C channels); the sub-category head is not used after training.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..losses import sc_cam_loss, subcategory_targets
from . import ClassifierMethod, register_method

LABELS_FILE = "subcategory_labels.npz"
ROUNDS_FILE = "rounds.json"
#: Which round final.pth is a copy of: ``{"rounds": R, "model": path}``. A run with another ``rounds`` than the one
#: that wrote final.pth goes on (finished rounds are skipped) instead of taking a model of the wrong round.
FINAL_OF_FILE = "final.json"


def _final_rounds(path: Path) -> int | None:
    """The ``rounds`` of the run that wrote final.pth (None when unknown or unreadable: the loop then re-checks
    its rounds, which skips the finished ones, and writes final.pth again)."""
    try:
        return int(json.loads(Path(path).read_text())["rounds"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def round_dir_name(round_index: int) -> str:
    return f"round_{round_index}"


@register_method
class SCCAM(ClassifierMethod):
    name = "sc_cam"
    head = "cls"

    def aux_heads(self, opts) -> dict:
        return {"subcategories": int(opts.num_subcategories)}

    def check_options(self, opts, section: str) -> None:
        from ..config import ConfigError
        from ..runtime import check_positive
        from . import check_range

        check_positive(opts, section, ("rounds", "num_subcategories", "kmeans_max_iter", "kmeans_n_init"),
                       ("kmeans_seed",))
        check_range(opts, section, "loss_weight", 0.0, float("inf"), low_open=False)
        for key in ("initial_checkpoint", "labels_file"):
            value = str(opts.get(key) or "")
            if value and not Path(value).is_file():
                raise ConfigError(f"{section}.{key}='{value}': no such file")

    def make_step(self, opts, num_classes: int, device):
        from ..config import ConfigError

        section = f"train_cls.{self.name}"
        self.check_options(opts, section)
        if not str(opts.get("labels_file") or ""):
            raise ConfigError(f"{section}.labels_file is empty: one round trains on a sub-category labels file; "
                              f"train_cls.method=sc_cam with it empty runs all rounds (bash script/sc_cam.sh)")
        table = read_subcategory_labels(opts.labels_file, num_classes, int(opts.num_subcategories), section)
        weight = float(opts.loss_weight)

        def step(model, batch, iteration):
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            missing = [i for i in batch["id"] if i not in table]
            if missing:
                raise ConfigError(f"{section}.labels_file='{opts.labels_file}' has no sub-category labels for "
                                  f"{missing[0]}: it was made for another train list")
            sub_labels = torch.from_numpy(np.stack([table[i] for i in batch["id"]])).to(device).float()
            logits, _, _, aux = model(images, aux=True)
            total, parent, sub = sc_cam_loss(logits[:, :num_classes], labels, aux["subcategory_logits"],
                                             sub_labels, weight)
            return total, {"cls": float(parent.detach()), "sub": float(sub.detach())}

        return step


# ------------------------------------------------------------------------------------------ labels file
def read_subcategory_labels(path, num_classes: int, num_subcategories: int, section: str) -> dict:
    """{image id: (C K,) uint8 labels} from a labels file; a file made for another C or K is a ConfigError."""
    from ..config import ConfigError

    with np.load(path, allow_pickle=False) as data:
        ids, labels = data["ids"].tolist(), data["labels"]
    if labels.shape[1:] != (num_classes * num_subcategories,):
        raise ConfigError(f"{section}.labels_file='{path}' holds labels of width {labels.shape[1:]} but "
                          f"{num_classes} classes x {section}.num_subcategories={num_subcategories} need "
                          f"{num_classes * num_subcategories}: make it again with this setting")
    return dict(zip(ids, labels))


def cluster_subcategories(features: np.ndarray, labels: np.ndarray, num_subcategories: int, seed: int = 0,
                          max_iter: int = 300, n_init: int = 10) -> np.ndarray:
    """Per-class k-means (module docstring, step 2). features (N, D), labels (N, C) -> cluster ids (N, C) int64,
    -1 where the image lacks the class. Deterministic for a seed."""
    from sklearn.cluster import KMeans

    n, c = labels.shape
    clusters = np.full((n, c), -1, dtype=np.int64)
    for cls in range(c):
        members = np.flatnonzero(labels[:, cls] > 0.5)
        if members.size == 0:
            continue
        k = min(int(num_subcategories), members.size)
        if k == 1:
            clusters[members, cls] = 0
            continue
        km = KMeans(n_clusters=k, random_state=int(seed), max_iter=int(max_iter), n_init=int(n_init))
        clusters[members, cls] = km.fit_predict(features[members].astype(np.float64))
    return clusters


def labels_from_clusters(clusters: np.ndarray, num_subcategories: int) -> np.ndarray:
    """Cluster ids (N, C) (-1 = absent) -> SC-CAM's multi-hot sub-category labels (N, C K) uint8."""
    n, c = clusters.shape
    per_class = {cls: (np.flatnonzero(clusters[:, cls] >= 0), clusters[clusters[:, cls] >= 0, cls])
                 for cls in range(c)}
    return subcategory_targets(per_class, n, c, num_subcategories).numpy().astype(np.uint8)


def write_subcategory_labels(path: Path, ids: list[str], clusters: np.ndarray, num_subcategories: int) -> Path:
    """Write ``ids``, ``labels`` (N, C K) and ``clusters`` (N, C) to ``path`` (.npz) atomically."""
    from ..io import atomic_save

    labels = labels_from_clusters(clusters, num_subcategories)

    def write(tmp):
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=np.array(ids), labels=labels, clusters=clusters)

    return atomic_save(path, write)


@torch.no_grad()
def extract_image_features(model, layout, ids: list[str], device, base_long: int = 0, resize: str = "pil",
                           num_workers: int = 0) -> np.ndarray:
    """(N, D) float32: for every image (whole, scale 1), the global average of the backbone's ``conv6``."""
    from torch.utils.data import DataLoader

    from ..data.voc import InferenceDataset, collate_single

    model.eval()
    loader = DataLoader(InferenceDataset(layout, ids, (1.0,), base_long, resize), batch_size=1,
                        num_workers=num_workers, collate_fn=collate_single)
    rows = []
    for item in loader:
        _, _, _, aux = model(item["scaled"][0][None].to(device), aux=True)
        rows.append(aux["backbone"]["conv6"].float().mean((2, 3))[0].cpu().numpy())
    return np.stack(rows).astype(np.float32)


# ------------------------------------------------------------------------------------------ round loop
def run_rounds(cfg, train_round) -> Path:
    """All SC-CAM rounds (module docstring). ``train_round(cfg) -> final.pth`` trains one stage-0 run (the
    stage's own training, so the loop needs no stage import). Returns ``<work_dir>/<out_subdir>/final.pth``."""
    from .. import dist
    from ..checkpoint import load_model
    from ..config import ConfigError, derive
    from ..data.voc import VOCLayout
    from ..run_layout import FINAL, RunLayout
    from ..runtime import get_logger

    sect, opts = cfg.train_cls, cfg.train_cls.sc_cam
    section = "train_cls.sc_cam"
    SCCAM().check_options(opts, section)
    resume = str(sect.resume)
    if resume not in ("auto", "none"):
        raise ConfigError(f"train_cls.resume='{resume}': the SC-CAM rounds resume with auto (each round from its "
                          f"own checkpoints) or start again with none")
    root = RunLayout(cfg).stage_dir("train_cls")
    final = root / FINAL
    final_of = root / FINAL_OF_FILE
    planned = int(opts.rounds)
    if final.is_file() and resume == "auto" and _final_rounds(final_of) == planned:
        print(f"{final} exists: the SC-CAM rounds are finished (train_cls.resume=none to train again)", flush=True)
        return final
    root.mkdir(parents=True, exist_ok=True)
    logger = get_logger("sc_cam", root / "log.txt")
    sub = str(sect.out_subdir)
    layout = VOCLayout.from_config(cfg)
    ids = layout.read_list(cfg.data.train_list)
    rounds_file = root / ROUNDS_FILE
    record = {} if resume == "none" or not rounds_file.is_file() else \
        {row["round"]: row for row in json.loads(rounds_file.read_text())}

    def train(round_index: int, **changes) -> tuple[Path, bool]:
        """(the round's final.pth, whether it was trained now: False for a finished round, skipped)."""
        round_final = root / round_dir_name(round_index) / FINAL
        if round_final.is_file() and resume == "auto":
            logger.info("round %d: %s exists, skipped", round_index, round_final)
            return round_final, False
        cfg_round = derive(cfg, train_cls__out_subdir=f"{sub}/{round_dir_name(round_index)}", **changes)
        return train_round(cfg_round), True

    def note(round_index: int, t0: float, worked: bool, **row) -> None:
        """Record a round in rounds.json; a skipped round keeps the timing of the run that did it."""
        if worked or round_index not in record:
            record[round_index] = {"round": round_index, **row, "seconds": round(time.perf_counter() - t0, 1)}
        if dist.is_main():
            rounds_file.write_text(json.dumps([record[r] for r in sorted(record)], indent=2))

    extractor = str(opts.initial_checkpoint or "")
    if not extractor:
        t0 = time.perf_counter()
        logger.info("round 0: a plain cam classifier, the first feature extractor")
        path, worked = train(0, train_cls__method="cam")
        extractor = str(path)
        note(0, t0, worked, model=extractor)
    k = int(opts.num_subcategories)
    for r in range(1, int(opts.rounds) + 1):
        t0 = time.perf_counter()
        labels_path = root / round_dir_name(r) / LABELS_FILE
        clustered = resume == "none" or not labels_path.is_file()
        if clustered:
            if dist.is_main():
                device = dist.init_from_env(cfg.device)
                model, _ = load_model(extractor, producer="the previous SC-CAM round", device=device,
                                      num_classes=layout.num_classes, key=f"{section} round {r} extractor",
                                      layout=layout)
                logger.info("round %d: features of %d images from %s", r, len(ids), extractor)
                features = extract_image_features(model, layout, ids, device, int(cfg.inference.base_long),
                                                  str(cfg.inference.resize), 0)
                del model
                labels = np.stack([layout.labels[i] for i in ids])
                clusters = cluster_subcategories(features, labels, k, int(opts.kmeans_seed),
                                                 int(opts.kmeans_max_iter), int(opts.kmeans_n_init))
                labels_path.parent.mkdir(parents=True, exist_ok=True)
                write_subcategory_labels(labels_path, ids, clusters, k)
                logger.info("round %d: k-means (K=%d, seed %d) -> %s", r, k, int(opts.kmeans_seed), labels_path)
            dist.barrier()
        path, worked = train(r, train_cls__sc_cam__labels_file=str(labels_path))
        extractor = str(path)
        note(r, t0, worked or clustered, labels=str(labels_path), model=extractor)
        logger.info("round %d/%d finished: %s", r, int(opts.rounds), extractor)
    if dist.is_main():
        from ..io import atomic_save

        atomic_save(final, lambda tmp: shutil.copyfile(extractor, tmp))
        atomic_save(final_of, lambda tmp: Path(tmp).write_text(json.dumps({"rounds": planned, "model": extractor})))
        logger.info("SC-CAM: the last round's model -> %s", final)
    dist.barrier()
    return final

