"""Fused multi-scale attention maps (stage 1's code path) against an independent per-image NumPy
implementation; prototypes against a direct computation; resume skips finished images."""
import logging

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn

from smaf.cam import BackgroundRule, class_feature_means, fuse_image, label_from_maps
from smaf.config import load_config
from smaf.data.transforms import normalize, resize_image
from smaf.data.voc import InferenceDataset, VOCLayout
from smaf.io import load_cam_dict, load_label_png
from smaf.models.cam_net import CAMNet
from smaf.cam.prototypes import aggregate_prototypes
from smaf.cam.writer import generate_fused_outputs

SCALES = (0.5, 1.0, 1.5, 2.0)


class TinyBackbone(nn.Module):
    """Stride-8 conv stack: enough structure for position-dependent CAMs, fast on CPU."""
    out_channels = 24

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 24, 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(24, 24, 3, 2, 1))

    def forward(self, x):
        return {"conv6": self.body(x)}


def tiny_model(head: str, num_classes: int = 5, seed: int = 0) -> CAMNet:
    torch.manual_seed(seed)
    model = CAMNet(TinyBackbone(), num_classes, head=head, feat_dim=8)
    for p in model.parameters():  # make the maps far from uniform
        p.data.mul_(3.0)
    return model.eval()


def numpy_fused(model, image, labels, scales=SCALES, flip=True, resize="cv2"):
    """Straightforward reference: one forward per scale and flip, post-processing in NumPy (``resize``: the
    image resize of the multi-scale inputs, ``inference.resize``)."""
    h, w = image.shape[:2]
    total = np.zeros((len(labels), h, w), np.float64)
    for s in scales:
        scaled = resize_image(image, (max(1, round(h * s)), max(1, round(w * s))), resize)
        for flipped in ((False, True) if flip else (False,)):
            x = normalize(scaled[:, ::-1] if flipped else scaled)
            with torch.no_grad():
                cam = model(torch.from_numpy(np.ascontiguousarray(x))[None])[1][0].numpy().astype(np.float64)
            if model.has_background:
                e = np.exp(cam - cam.max(0, keepdims=True))
                act = (e / e.sum(0, keepdims=True))[:-1]
            else:
                act = np.maximum(cam, 0)
            for c in range(act.shape[0]):
                up = cv2.resize(act[c].astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
                total[c] += up[:, ::-1] if flipped else up
    total *= np.asarray(labels)[:, None, None]
    total /= total.reshape(len(labels), -1).max(1)[:, None, None] + 1e-5
    return total


@pytest.mark.parametrize("flip_in_batch", [None, True])   # CPU default: a second pass; True: the GPU's batch
@pytest.mark.parametrize("head", ["smaf", "cls"])
@pytest.mark.parametrize("size", [(37, 53), (64, 64), (81, 45)])
def test_fused_maps_equal_numpy_reference(head, size, flip_in_batch):
    rng = np.random.default_rng(size[0])
    image = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
    image = cv2.GaussianBlur(image, (5, 5), 2)
    labels = np.array([1, 0, 1, 0, 1], np.float32)
    model = tiny_model(head)
    scaled = [torch.from_numpy(normalize(resize_image(image, (round(size[0] * s), round(size[1] * s)))))
              for s in SCALES]
    result = fuse_image(model, scaled, torch.from_numpy(labels), size, flip=True, flip_in_batch=flip_in_batch)
    expected = numpy_fused(model, image, labels)
    assert result.classes == [0, 2, 4]
    np.testing.assert_allclose(result.maps.numpy(), expected[[0, 2, 4]], atol=1e-5)
    assert result.maps.amax((1, 2)).min() > 0.99  # each class normalised by its maximum


def test_single_scale_is_the_same_code():
    image = np.random.default_rng(1).integers(0, 255, (40, 52, 3), dtype=np.uint8)
    labels = np.array([0, 1, 0, 0, 1], np.float32)
    model = tiny_model("smaf")
    result = fuse_image(model, [torch.from_numpy(normalize(image))], torch.from_numpy(labels), (40, 52), flip=False)
    np.testing.assert_allclose(result.maps.numpy(), numpy_fused(model, image, labels, (1.0,), False)[[1, 4]],
                               atol=1e-5)


def test_single_index_returns_the_single_scale_cam_of_the_same_passes():
    """The scale-1.0 unflipped pass of a multi-scale x flip call is what a separate single-scale call returns."""
    image = cv2.GaussianBlur(np.random.default_rng(3).integers(0, 255, (45, 61, 3), dtype=np.uint8), (5, 5), 2)
    labels = torch.tensor([1, 0, 0, 1, 1], dtype=torch.float32)
    model = tiny_model("smaf")
    scaled = [torch.from_numpy(normalize(resize_image(image, (round(45 * s), round(61 * s))))) for s in SCALES]
    both = fuse_image(model, scaled, labels, (45, 61), flip=True, single_index=SCALES.index(1.0))
    alone = fuse_image(model, [scaled[SCALES.index(1.0)]], labels, (45, 61), flip=False)
    fused = fuse_image(model, scaled, labels, (45, 61), flip=True)
    np.testing.assert_allclose(both.single.numpy(), alone.maps.numpy(), atol=1e-6)
    np.testing.assert_array_equal(both.maps.numpy(), fused.maps.numpy())   # the fused maps are untouched
    assert not np.allclose(both.single.numpy(), both.maps.numpy(), atol=1e-3)   # and they are other maps
    assert fuse_image(model, scaled, labels, (45, 61)).single is None


def test_stage1_writes_the_single_scale_folder_a_separate_run_would(tiny_voc, tmp_path):
    """gen_fusion with fusion.single_subdir: the single-scale folder equals a separate scales [1.0], no-flip run
    (maps, PNGs, prototypes, mIoU), the fused folder equals a run without it, and resume needs both folders."""
    from smaf.checkpoint import save_checkpoint
    from smaf.config import Config, ConfigError
    from smaf.models import build_model
    from smaf.stages import gen_fusion

    def _cfg(root, work, **extra):   # the demo's network (EfficientNet-Lite0, random weights) on the tiny set
        lists = f"{root}/ImageSets/Segmentation"
        return load_config("demo", [f"data.root={root}", f"work_dir={work}", "num_workers=0", "model.pretrained=",
                                    f"data.train_list={lists}/train.txt", f"data.infer_list={lists}/train.txt"]
                           + [f"{k}={v}" for k, v in extra.items()])

    cfg = _cfg(tiny_voc, tmp_path)
    layout = VOCLayout.from_config(cfg)
    torch.manual_seed(0)
    model = build_model(Config(dict(cfg.model, head="smaf")), layout.num_classes)
    ckpt = tmp_path / "model.pth"
    save_checkpoint(ckpt, model, iteration=0)
    common = {"fusion.checkpoint": str(ckpt), "fusion.overlays": 1}
    combined = gen_fusion.run(_cfg(tiny_voc, tmp_path, **common, **{
        "inference.base_long": 48, "inference.scales": "[0.5,1.0]", "fusion.out_subdir": "multi",
        "fusion.single_subdir": "single"}))
    separate = gen_fusion.run(_cfg(tiny_voc, tmp_path, **common, **{
        "inference.base_long": 48, "inference.scales": "[1.0]", "inference.flip": "false",
        "fusion.out_subdir": "single_alone"}))
    plain = gen_fusion.run(_cfg(tiny_voc, tmp_path, **common, **{
        "inference.base_long": 48, "inference.scales": "[0.5,1.0]", "fusion.out_subdir": "multi_alone"}))
    assert combined["single"]["miou"] == pytest.approx(separate["miou"], abs=1e-6)
    assert combined["miou"] == pytest.approx(plain["miou"], abs=1e-9)
    ids = layout.read_list(cfg.data.train_list)
    for image_id in ids:
        for got, want in (("single", "single_alone"), ("multi", "multi_alone")):
            a, b = (load_cam_dict(tmp_path / d / "cam_npy" / f"{image_id}.npy") for d in (got, want))
            assert sorted(a) == sorted(b)
            for c in a:
                np.testing.assert_allclose(a[c], b[c], atol=1e-6)
            np.testing.assert_array_equal(load_label_png(tmp_path / got / "cam_png" / f"{image_id}.png"),
                                          load_label_png(tmp_path / want / "cam_png" / f"{image_id}.png"))
    protos = [torch.load(tmp_path / d / "prototypes.pt", weights_only=True) for d in ("single", "single_alone")]
    for key, value in protos[0].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, protos[1][key], atol=1e-6, rtol=1e-5)
    written = load_config(str(tmp_path / "single" / "config.yaml"))
    assert list(written.inference.scales) == [1.0] and written.inference.flip is False
    assert len(list((tmp_path / "single" / "overlays").glob("*.jpg"))) == 1
    # resume: an image missing from the single-scale folder only is redone (in both, the same values)
    (tmp_path / "single" / "cam_png" / f"{ids[0]}.png").unlink()
    again = gen_fusion.run(_cfg(tiny_voc, tmp_path, **common, **{
        "inference.base_long": 48, "inference.scales": "[0.5,1.0]", "fusion.out_subdir": "multi",
        "fusion.single_subdir": "single"}))
    assert again["single"]["miou"] == pytest.approx(combined["single"]["miou"], abs=1e-9)
    assert (tmp_path / "single" / "cam_png" / f"{ids[0]}.png").is_file()
    with pytest.raises(ConfigError, match=r"fusion.single_subdir: .*inference.scales"):
        gen_fusion.run(_cfg(tiny_voc, tmp_path, **common, **{
            "inference.scales": "[0.5,1.5]", "fusion.out_subdir": "bad", "fusion.single_subdir": "bad_single"}))
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad_single").exists()


def test_label_from_maps_uses_voc_numbering():
    from smaf.cam import FusedResult

    maps = torch.tensor([[[0.1, 0.9, 0.3]], [[0.5, 0.2, 0.1]]])
    label = label_from_maps(FusedResult([1, 3], maps), bg_threshold=0.25)
    assert label.tolist() == [[4, 2, 2]]


def test_class_feature_means_direct():
    feature = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 4, 4)
    label = torch.zeros(8, 8, dtype=torch.uint8)
    label[:, 4:] = 3            # class 2 on the right half: 8 feature pixels
    label[0:2, 0:2] = 1         # class 0 on one feature pixel only (< min_pixels)
    means = class_feature_means(feature, label, num_classes=5, min_pixels=2)
    small = label[::2, ::2]
    assert set(means) == {2, 5}   # class 2, background last (index C = 5); class 0 skipped (1 pixel)
    for index, value in ((2, 3), (5, 0)):
        mask = (small == value).flatten()
        np.testing.assert_allclose(means[index].numpy(), feature.view(2, -1)[:, mask].mean(1).numpy(), rtol=1e-6)


def _cfg(root, tmp_path, **extra):
    overrides = [f"data.root={root}", "data.cls_labels=", f"work_dir={tmp_path}", "num_workers=0",
                 f"data.train_list={root}/ImageSets/Segmentation/train.txt",
                 f"data.infer_list={root}/ImageSets/Segmentation/train.txt"]
    return load_config("voc12", overrides + [f"{k}={v}" for k, v in extra.items()])


def test_stage1_outputs_match_reference_prototypes_and_resume(tiny_voc, tmp_path):
    cfg = _cfg(tiny_voc, tmp_path)
    layout = VOCLayout.from_config(cfg)
    ids = layout.read_list(cfg.data.train_list)[:5]
    model = tiny_model("smaf")
    out_dir = tmp_path / "fusion"
    logger = logging.getLogger("test")
    n = generate_fused_outputs(model, layout, ids, out_dir, torch.device("cpu"), logger, cfg.inference,
                               BackgroundRule(), num_overlays=2, prototype_min_pixels=cfg.fusion.prototype_min_pixels,
                               desc="test")
    assert n == 5
    for image_id in ids:
        image = layout.load_image(image_id)
        labels = layout.labels[image_id]
        expected = numpy_fused(model, image, labels, resize=cfg.inference.resize)
        cams = load_cam_dict(out_dir / "cam_npy" / f"{image_id}.npy")
        assert sorted(cams) == np.nonzero(labels)[0].tolist()
        for c, m in cams.items():
            np.testing.assert_allclose(m, expected[c], atol=1e-5)
        png = load_label_png(out_dir / "cam_png" / f"{image_id}.png")
        bg = np.full((1, *image.shape[:2]), 0.2)
        np.testing.assert_array_equal(png, np.argmax(np.concatenate([bg, expected]), 0))
    assert len(list((out_dir / "overlays").glob("*.jpg"))) == 2

    # prototypes: mean over images of per-image class-mean features of the scale-1 pass (direct computation)
    protos, counts = aggregate_prototypes(out_dir, ids, layout.num_classes, 8)
    sums, cnt = np.zeros((6, 8)), np.zeros(6)
    for image_id in ids:
        image = layout.load_image(image_id)
        with torch.no_grad():
            f = model(torch.from_numpy(normalize(image))[None])[2][0].numpy()
        png = load_label_png(out_dir / "cam_png" / f"{image_id}.png")
        small = cv2.resize(png, (f.shape[2], f.shape[1]), interpolation=cv2.INTER_NEAREST)
        for value in np.unique(small):
            mask = small == value
            if mask.sum() >= cfg.fusion.prototype_min_pixels:
                k = 5 if value == 0 else value - 1
                sums[k] += f[:, mask].mean(1)
                cnt[k] += 1
    np.testing.assert_array_equal(counts.numpy(), cnt)
    seen = cnt > 0
    np.testing.assert_allclose(protos.numpy()[seen], (sums[seen] / cnt[seen, None]), rtol=1e-5, atol=1e-6)

    # resume: finished images are skipped, a missing one is redone
    (out_dir / "cam_png" / f"{ids[1]}.png").unlink()
    again = generate_fused_outputs(model, layout, ids, out_dir, torch.device("cpu"), logger, cfg.inference,
                                   BackgroundRule(), prototype_min_pixels=cfg.fusion.prototype_min_pixels,
                                   desc="test")
    assert again == 1
    assert (out_dir / "cam_png" / f"{ids[1]}.png").is_file()


def _reference_resize(image: np.ndarray, size: tuple[int, int], method: str) -> np.ndarray:
    """The two references, called directly: PIL's BICUBIC (what PSA / EPS / SMAF use) or OpenCV's INTER_CUBIC."""
    from PIL import Image

    h, w = size
    if method == "pil":
        return np.asarray(Image.fromarray(image).resize((w, h), resample=Image.BICUBIC))
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_CUBIC)


@pytest.mark.parametrize("method", ["pil", "cv2"])
def test_inference_dataset_matches_reference_resize(tiny_voc, method):
    from PIL import Image

    layout = VOCLayout(tiny_voc)
    ids = layout.read_list(tiny_voc / "ImageSets/Segmentation/val.txt")[:1]
    sample = InferenceDataset(layout, ids, scales=SCALES, resize=method)[0]
    with Image.open(layout.image_path(ids[0])) as img:
        original = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(sample["image"], original)
    h, w = original.shape[:2]
    mean = np.array([0.485, 0.456, 0.406], np.float32)   # ImageNet statistics, RGB order
    std = np.array([0.229, 0.224, 0.225], np.float32)
    other = "cv2" if method == "pil" else "pil"
    differs_from_other = False
    for s, x in zip(SCALES, sample["scaled"]):
        size = (round(h * s), round(w * s))
        assert tuple(x.shape) == (3, *size) and x.dtype == torch.float32
        reference = original if s == 1.0 else _reference_resize(original, size, method)
        expected = ((reference.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1)
        # one grey level is 1/255/std > 0.017: any pixel off by one fails
        np.testing.assert_allclose(x.numpy(), expected, rtol=0, atol=1e-5, err_msg=f"scale {s}")
        if s != 1.0:
            differs_from_other |= not np.array_equal(reference, _reference_resize(original, size, other))
    assert differs_from_other   # the two references differ here, so the comparison tells them apart


def test_inference_dataset_base_long_rescales_before_the_scales(tiny_voc):
    layout = VOCLayout(tiny_voc)
    ids = layout.read_list(tiny_voc / "ImageSets/Segmentation/val.txt")[:2]
    for sample in InferenceDataset(layout, ids, scales=(0.5, 1.0), base_long=40):
        h, w = sample["image"].shape[:2]
        bh, bw = round(h * 40 / max(h, w)), round(w * 40 / max(h, w))
        assert [tuple(x.shape[1:]) for x in sample["scaled"]] == [(round(bh * 0.5), round(bw * 0.5)), (bh, bw)]
        assert max(sample["scaled"][1].shape[1:]) == 40


def test_stage1_pngs_follow_the_per_image_otsu_rule(tiny_voc, tmp_path):
    from smaf.cam import otsu_threshold
    from smaf.cam.report import evaluate_outputs

    cfg = _cfg(tiny_voc, tmp_path)
    layout = VOCLayout.from_config(cfg)
    ids = layout.read_list(cfg.data.train_list)[:4]
    model = tiny_model("cls")   # ReLU maps, as from a plain CAM classifier
    out_dir = tmp_path / "fusion"
    rule = BackgroundRule("otsu", 0.2)
    generate_fused_outputs(model, layout, ids, out_dir, torch.device("cpu"), logging.getLogger("test"),
                           cfg.inference, rule, desc="test")
    scores = []
    for image_id in ids:
        cams = load_cam_dict(out_dir / "cam_npy" / f"{image_id}.npy")
        stack = np.stack([cams[k] for k in sorted(cams)])
        t = otsu_threshold(torch.from_numpy(stack.max(0)))
        scores.append(t)
        expected = np.where(stack.max(0) > t, np.array(sorted(cams))[stack.argmax(0)] + 1, 0)
        np.testing.assert_array_equal(load_label_png(out_dir / "cam_png" / f"{image_id}.png"), expected)
    assert len(set(scores)) > 1   # a threshold per image
    report = evaluate_outputs(layout, out_dir, "cam_png", ids, logging.getLogger("test"), set(ids),
                              bg_rule=rule)
    assert report["bg_threshold"] == "otsu"
    assert report["bg_scores"]["median"] == pytest.approx(float(np.median(scores)))
    assert report["bg_scores"]["fallback_images"] == 0


def test_cpu_bf16_autocast_runs_bf16_and_stays_close_to_fp32(tiny_voc):
    from smaf.amp import autocast_context

    layout = VOCLayout(tiny_voc)
    image_id = layout.read_list(f"{tiny_voc}/ImageSets/Segmentation/train.txt")[0]
    sample = InferenceDataset(layout, [image_id], scales=SCALES)[0]
    model = tiny_model("smaf")
    cpu = torch.device("cpu")
    with torch.no_grad(), autocast_context(cpu, "bf16"):
        assert model(sample["scaled"][0][None])[1].dtype == torch.bfloat16
    args = (model, sample["scaled"], sample["labels"], sample["image"].shape[:2])
    fp32 = fuse_image(*args).maps
    bf16 = fuse_image(*args, amp="bf16").maps
    fp16_on_cpu = fuse_image(*args, amp="fp16").maps   # CUDA-only: fp32 on the CPU
    diff = float((bf16 - fp32).abs().max())
    # bf16 keeps 8 mantissa bits: this random tiny net (weights x3) differs by ~5e-2 at worst; the trained
    # EfficientNet-Lite0 of the Pet run by 2.7e-2 at worst, 2e-3 on average (README, speed benchmark)
    assert 0 < diff <= 0.1
    assert float((bf16 - fp32).abs().mean()) <= 1e-2
    assert torch.equal(fp16_on_cpu, fp32)
