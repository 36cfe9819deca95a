"""Shared fixtures. Real data lives in ``../shared`` beside the repository (never copied into it);
tests that need it skip with a reason when it is absent, and fail with that reason when
``SMAF_REQUIRE_SHARED=1`` (CI sets it: CI always has ``../shared``, so a missing set there is an error, never a
silent skip). Every real-data test goes through these fixtures (or :func:`real_data_missing`)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SMAF_SHARED", REPO_ROOT.parent / "shared"))
PETS_ROOT = SHARED / "data" / "pets"
VOC_META = SHARED / "data" / "voc12"
MSRC_ROOT = SHARED / "data" / "msrc"
#: Set to 1 by .ci/run: real data that is absent fails the tests that need it instead of skipping them.
REQUIRE_SHARED_ENV = "SMAF_REQUIRE_SHARED"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # under pytest-xdist (setup.cfg: one worker per core) each worker gets one core's share of threads, so two
    # workers on two cores do not fight over them; tiny tensors gain nothing from intra-op threads anyway
    import torch

    from smaf.runtime import available_cores

    torch.set_num_threads(max(1, available_cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def pytest_collection_modifyitems(config, items):
    """Heaviest files first. A file's weight is the largest ``pytest.mark.cost(seconds)`` of its tests (a rough
    one-core time; unmarked: 0); the sort is stable, so every xdist worker collects the same order, and
    ``--dist loadfile --no-loadscope-reorder`` (setup.cfg) hands files out in it: the longest file starts at once
    instead of running alone after the rest (longest-first keeps the workers' finishing times close)."""
    weight = {}
    for item in items:
        marker = item.get_closest_marker("cost")
        weight[item.path] = max(weight.get(item.path, 0.0), float(marker.args[0]) if marker else 0.0)
    items.sort(key=lambda item: -weight[item.path])


def real_data_missing(reason: str):
    """Skip the running test with ``reason`` (real data absent), or fail it with the same reason when
    ``SMAF_REQUIRE_SHARED=1``."""
    if os.environ.get(REQUIRE_SHARED_ENV) == "1":
        pytest.fail(f"{reason}; {REQUIRE_SHARED_ENV}=1 (CI) requires it", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def pets_root() -> Path:
    """The real Oxford-IIIT Pet subset in VOC layout (skips when ../shared is absent)."""
    if not (PETS_ROOT / "JPEGImages").is_dir():
        real_data_missing(f"real Pet subset not found at {PETS_ROOT} (../shared beside the repo, or set SMAF_SHARED)")
    return PETS_ROOT


@pytest.fixture
def msrc_root() -> Path:
    """The real MSRC-v2 set mapped to VOC classes, VOC layout (skips when ../shared is absent)."""
    if not (MSRC_ROOT / "JPEGImages").is_dir():
        real_data_missing(f"real MSRC set not found at {MSRC_ROOT} (../shared beside the repo, or set SMAF_SHARED)")
    return MSRC_ROOT


@pytest.fixture
def voc_meta() -> Path:
    """Real VOC 2012 metadata and val masks (skips when ../shared is absent)."""
    if not (VOC_META / "SegmentationClassAug_val").is_dir():
        real_data_missing(f"VOC metadata not found at {VOC_META} (../shared beside the repo, or set SMAF_SHARED)")
    return VOC_META


@pytest.fixture(scope="session")
def tiny_voc(tmp_path_factory) -> Path:
    """A tiny synthetic VOC-layout root (12 train + 6 val images, 64-96 px, 5 classes) with masks, synthetic
    saliency, cls_labels.npy, labels.txt and ImageSets/Segmentation/{train,val}.txt; generated once per session
    (well under a second). Treat it as read-only: other tests share it."""
    from smaf.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("tiny_voc") / "voc", num_train=12, num_val=6, seed=0,
                                  min_size=64, max_size=96, num_classes=5)
