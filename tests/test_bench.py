"""The benchmark (python -m smaf.bench) end to end on 3 tiny synthetic images: fused maps of our path and of
the per-image baseline agree, the CRF and evaluation sections run, and the JSON report has its fields."""
import json

import numpy as np
import pytest
import torch

from smaf.amp import cpu_has_fast_bf16
from smaf.bench import cli as bench_cli
from smaf.bench.common import build_bench_model
from smaf.bench.fusion import baseline_fused, baseline_label
from smaf.cam import BackgroundRule


def test_bench_sections_a_b_c_on_tiny_images(tiny_voc, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench_cli.main(["--device", "cpu", "--data", str(tiny_voc), "--list",
                       str(tiny_voc / "ImageSets/Segmentation/val.txt"), "--images", "3", "--repeats", "1",
                       "--sections", "a,b,c", "--backbones", "efficientnet_lite0", "--size", "0", "--crf-size", "0",
                       "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    text = capsys.readouterr().out
    assert "a. fused maps" in text and "b. dense CRF" in text and "c. evaluation" in text

    env = report["environment"]
    for key in ("device", "torch", "torch_threads", "cores", "load_average", "omp_wait_policy"):
        assert key in env, key
    assert env["device"] == "cpu" and env["torch"] == torch.__version__

    (fusion,) = report["fusion"]
    assert fusion["backbone"] == "efficientnet_lite0" and fusion["num_images"] == 3
    assert fusion["scales"] == [0.5, 1.0, 1.5, 2.0] and fusion["flip"] is True
    for key in ("ours_images_per_s", "baseline_images_per_s", "ratio"):
        assert fusion[key] > 0, key
    assert fusion["ratio"] == pytest.approx(fusion["ours_images_per_s"] / fusion["baseline_images_per_s"])
    assert len(fusion["times_s"]["ours"]) == len(fusion["times_s"]["baseline"]) == 1
    assert fusion["max_abs_diff"] <= 1e-4 and fusion["outputs_match"] is True
    assert fusion["png_agreement"] > 0.999
    assert fusion["target_ratio"] == 1.5 and isinstance(fusion["pass"], bool)
    amp = fusion["amp_variant"]
    if cpu_has_fast_bf16():   # our path once more with bf16 autocast, compared with the fp32 baseline
        assert amp["amp"] == "bf16" and amp["images_per_s"] > 0 and len(fusion["times_s"]["ours_amp"]) == 1
        assert 0 < amp["max_abs_diff"] < 0.1 and amp["within_tolerance"] == (amp["max_abs_diff"] <= 2e-2)
        assert "+ ours amp bf16" in text
    else:
        assert amp is None

    crf = report["crf"]
    assert crf["num_images"] == 3 and crf["pool_workers"] == crf["cores"] >= 1
    assert crf["masks"] == "section a's fused-map PNGs"
    for key in ("single_images_per_s", "pool_images_per_s", "speedup", "target_images_per_s"):
        assert crf[key] > 0, key
    assert crf["target_speedup"] == pytest.approx(0.9 * crf["pool_workers"])

    evaluation = report["evaluation"]
    assert evaluation["num_images"] == 3 and evaluation["miou"] == 100.0 and evaluation["images_per_s"] > 0

    names = [t["name"] for t in report["targets"]]
    assert any("CRF pool" in n for n in names) and any("GPU" in n for n in names)
    assert "training" not in report


def test_baseline_matches_the_fused_path_on_one_image():
    """The baseline's NumPy post-processing reproduces fuse_image (independently of the stage plumbing)."""
    from smaf.cam import fuse_image, label_from_maps
    from smaf.data.transforms import normalize, resize_image
    from smaf.models.cam_net import CAMNet

    class Backbone(torch.nn.Module):
        out_channels = 8

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, 4, 1)

        def forward(self, x):
            return {"conv6": self.conv(x)}

    torch.manual_seed(0)
    model = CAMNet(Backbone(), 4, feat_dim=8).eval()
    image = np.random.default_rng(0).integers(0, 255, (45, 61, 3), dtype=np.uint8)
    labels = np.array([1, 0, 0, 1], np.float32)
    scales = (0.5, 1.0, 1.5)
    for resize in ("pil", "cv2"):   # the baseline resizes as the config says (the reference: PIL bicubic)
        classes, maps = baseline_fused(model, image, labels, scales, True, torch.device("cpu"), resize=resize)
        scaled = [torch.from_numpy(normalize(resize_image(image, (round(45 * s), round(61 * s)), resize)))
                  for s in scales]
        result = fuse_image(model, scaled, torch.from_numpy(labels), (45, 61))
        assert classes == result.classes == [0, 3]
        np.testing.assert_allclose(maps, result.maps.numpy(), atol=1e-5)
        np.testing.assert_array_equal(baseline_label(classes, maps, 0.2), label_from_maps(result, 0.2).numpy())


def test_bad_section_is_a_usage_error():
    with pytest.raises(SystemExit):
        bench_cli.parse_args(["--sections", "a,x"])


def test_cpu_worker_fusion_writes_the_files_of_the_in_process_path(tiny_voc, tmp_path, monkeypatch):
    """generate_fused_outputs on CPU with a loader worker per core (workers fuse whole images) writes what the
    in-process path writes: maps, PNGs, prototype statistics and overlays."""
    import logging

    from smaf.config import load_config
    from smaf.data.voc import VOCLayout
    from smaf.io import load_cam_dict, load_label_png
    from smaf.cam import writer

    root = tiny_voc
    layout = VOCLayout(root)
    ids = layout.read_list(root / "ImageSets/Segmentation/train.txt")[:4]
    model, _ = build_bench_model("efficientnet_lite0", layout.num_classes, torch.device("cpu"),
                                       pretrained=False)
    from smaf import runtime

    # two cores as seen by both the worker-count cap and the CPU worker-mode switch
    monkeypatch.setattr(writer, "available_cores", lambda: 2)
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    dirs = {}
    for workers in (0, 2):
        cfg = load_config("voc12", [f"data.root={root}", "data.cls_labels=", f"work_dir={tmp_path}",
                                    f"num_workers={workers}", "inference.scales=[0.5,1.0]"])
        out = dirs[workers] = tmp_path / f"w{workers}"
        n = writer.generate_fused_outputs(model, layout, ids, out, torch.device("cpu"), logging.getLogger("test"),
                                          cfg.inference, BackgroundRule(), num_workers=cfg.num_workers,
                                          num_overlays=2, prototype_min_pixels=10, desc="t")
        assert n == len(ids)
    for image_id in ids:
        a, b = (load_cam_dict(dirs[w] / "cam_npy" / f"{image_id}.npy") for w in (0, 2))
        assert sorted(a) == sorted(b)
        for c in a:
            np.testing.assert_allclose(b[c], a[c], atol=1e-5)
        np.testing.assert_array_equal(*(load_label_png(dirs[w] / "cam_png" / f"{image_id}.png") for w in (0, 2)))
        sa, sb = (load_cam_dict(dirs[w] / "proto_stats" / f"{image_id}.npy") for w in (0, 2))
        assert sorted(sa) == sorted(sb)
        for k in sa:
            np.testing.assert_allclose(sb[k], sa[k], rtol=1e-5, atol=1e-6)
    assert len(list((dirs[2] / "overlays").glob("*.jpg"))) == 2


def test_efficientnet_cpu_inference_padding_is_exact():
    """The explicit padding of the large-dilation depthwise convs (CPU inference only) changes no value."""
    from smaf.models.efficientnet_lite import EfficientNetLite0

    torch.manual_seed(0)
    net = EfficientNetLite0(output_stride=8, pretrained=False).eval()
    x = torch.randn(2, 3, 75, 99)
    with torch.no_grad():
        fast = net(x)["conv6"]
    slow = net(x)["conv6"].detach()   # autograd on: the implicit-padding path
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)  # bit-identical on the dev machine


def test_bench_section_e_times_the_refiners_on_voc_sized_images(tiny_voc, tmp_path, capsys):
    """Section e runs from the command line on VOC-sized inputs whatever --data holds (the tiny set's images are
    64-96 px), and its target row is the walk's measured time against 2 s on a CPU."""
    out = tmp_path / "bench.json"
    code = bench_cli.main(["--device", "cpu", "--data", str(tiny_voc), "--sections", "e", "--refine-images", "1",
                           "--repeats", "1", "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert "e. affinity refiners" in capsys.readouterr().out
    refiners = report["refiners"]
    assert refiners["image_sizes"] == [[375, 500]] and refiners["num_images"] == 1
    walk_s = refiners["rw_walk"]["seconds_per_image"]
    assert refiners["rw_pass"] is (walk_s < 2.0)
    (row,) = [t for t in report["targets"] if t["name"].startswith("random walk of one VOC-sized image on CPU")]
    assert row["pass"] is refiners["rw_pass"] and f"{1000 * walk_s:.1f} ms" in row["detail"]
    assert [t["pass"] for t in report["targets"] if "on GPU < 50 ms" in t["name"]] == [None]
    assert "fusion" not in report and "crf" not in report


@pytest.mark.parametrize("backbone", ["vit_s14_focus", "mit_b1"])
def test_transformer_backbones_are_benchmarked_at_their_stride(backbone):
    from smaf.bench.common import BENCH_OUTPUT_STRIDE, DEFAULT_BACKBONES

    args = bench_cli.parse_args(["--device", "cpu", "--backbones", backbone])
    assert args.backbones == [backbone]
    assert bench_cli.parse_args(["--device", "cpu"]).backbones == list(DEFAULT_BACKBONES)
    model, weights = build_bench_model(backbone, 3, torch.device("cpu"), pretrained=False)
    assert weights.startswith("random init") and model.backbone.output_stride == BENCH_OUTPUT_STRIDE[backbone]
    batch, crop = bench_cli.train_settings(backbone, args, torch.device("cpu"))
    if backbone == "vit_s14_focus":     # crops a multiple of the patch, as the ViT configs use
        assert crop % 14 == 0
    with torch.no_grad():
        logits, cams, _ = model(torch.randn(1, 3, crop, crop))
    side = -(-crop // BENCH_OUTPUT_STRIDE[backbone])   # the smaf head: C + 1 outputs, maps at the stride
    assert logits.shape == (1, 4) and cams.shape == (1, 4, side, side)
