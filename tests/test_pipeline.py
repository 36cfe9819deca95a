"""The four stages on a tiny synthetic set: training steps, exact resume, EMA/prototype updates, the CRF
step, and an end-to-end run that must produce every promised file."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from smaf.checkpoint import load_model, read_checkpoint
from smaf.config import load_config
from smaf.cam.prototypes import PrototypeBank
from smaf.engine import ema_update
from smaf.refine import CRFLabelRefiner, CRFParams, crf_refine_labels, refine_folder
from smaf.stages import gen_fusion, gen_pm, train_cls, train_fusion


def tiny_cfg(root, work_dir, *extra):
    lst = f"{root}/ImageSets/Segmentation"
    return load_config("demo", [
        f"work_dir={work_dir}", f"data.root={root}", f"data.train_list={lst}/train.txt",
        f"data.infer_list={lst}/train.txt", f"data.val_list={lst}/val.txt", "num_workers=0",
        "train_cls.crop=64", "train_cls.resize_long=[56,96]", "train_cls.batch_size=4", "train_cls.iterations=4",
        "train_cls.ckpt_every=2", "train_cls.val_every=2", "train_cls.val_max_images=2", "train_cls.log_every=2",
        "train_fusion.crop=64", "train_fusion.resize_long=[56,96]", "train_fusion.batch_size=4",
        "train_fusion.iterations=4", "train_fusion.ckpt_every=2", "train_fusion.val_every=2",
        "train_fusion.val_max_images=2", "train_fusion.log_every=2", "inference.scales=[0.5,1.0,1.5]",
        "fusion.overlays=2", "pseudo_masks.overlays=2", "crf.overlays=2", "crf.workers=2", *extra])


def _run_pipeline_kwargs(monkeypatch, argv) -> dict:
    """The keyword arguments ``python -m smaf.pipeline <argv>`` passes to run_pipeline (faked: no stage runs)."""
    import smaf.pipeline as pipeline_module

    seen = {}

    def fake_run_pipeline(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop after recording")

    monkeypatch.setattr(pipeline_module, "run_pipeline", fake_run_pipeline)
    with pytest.raises(RuntimeError, match="stop after recording"):
        pipeline_module.main(argv)
    return seen


def _weights(path):
    return read_checkpoint(path)["model"]


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def pipeline(tiny_voc, tmp_path_factory):
    """Stages 0-3 (+ CRF) run once on the tiny set; returns (cfg, results)."""
    work = tmp_path_factory.mktemp("pipeline")
    cfg = tiny_cfg(tiny_voc, work)
    results = {"final_cls": train_cls.run(cfg), "fusion": gen_fusion.run(cfg)}
    results["final_fusion"] = train_fusion.run(cfg)
    results["pm"] = gen_pm.run(cfg)
    return cfg, results


def test_end_to_end_produces_every_promised_file(pipeline, tiny_voc):
    cfg, results = pipeline
    work = cfg.work_dir
    from pathlib import Path

    work = Path(work)
    ids = (tiny_voc / "ImageSets/Segmentation/train.txt").read_text().split()
    for stage in ("train_cls", "train_fusion"):
        d = work / stage
        for name in ("final.pth", "config.yaml", "log.txt", "metrics.jsonl"):
            assert (d / name).is_file(), d / name
        assert list((d / "checkpoints").glob("iter_*.pth"))
    assert (work / "train_fusion" / "final_teacher.pth").is_file()
    fusion = work / "fusion"
    for image_id in ids:
        assert (fusion / "cam_npy" / f"{image_id}.npy").is_file()
        assert (fusion / "cam_png" / f"{image_id}.png").is_file()
        for sub in ("cam_npy", "cam_png", "crf_png"):
            assert (work / "pseudo_masks" / sub / f"{image_id}.png").with_suffix(
                ".npy" if sub == "cam_npy" else ".png").is_file()
    protos = torch.load(fusion / "prototypes.pt")["prototypes"]
    assert protos.shape == (6, 128) and torch.isfinite(protos).all()
    assert (fusion / "eval" / "cam_png.json").is_file()
    assert (work / "pseudo_masks" / "eval" / "cam_png.json").is_file()
    assert (work / "pseudo_masks" / "eval" / "crf_png.json").is_file()
    assert len(list((fusion / "overlays").glob("*.jpg"))) == 2
    assert len(list((work / "pseudo_masks" / "overlays").glob("*_crf.jpg"))) == 2
    for key in ("miou",):
        assert 0.0 <= results["fusion"][key] <= 100.0
    assert 0.0 <= results["pm"]["miou_crf"] <= 100.0
    val_lines = [ln for ln in (work / "train_cls" / "metrics.jsonl").read_text().splitlines() if "val_miou" in ln]
    assert val_lines, "periodic validation mIoU was not logged"


def _mtimes(folder):
    """mtime of every output file under ``folder``; the log and the saved config are rewritten by every run."""
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("log.txt", "config.yaml")}


def test_finished_stages_are_skipped(pipeline, tiny_voc):
    from pathlib import Path

    cfg, results = pipeline
    work = Path(cfg.work_dir)
    n_ids = len((tiny_voc / "ImageSets/Segmentation/train.txt").read_text().split())
    stages = ("train_cls", "fusion", "train_fusion", "pseudo_masks")
    before = {stage: _mtimes(work / stage) for stage in stages}
    logs = {stage: (work / stage / "log.txt").read_text() for stage in stages}
    assert len([p for p in before["fusion"] if p.parent.name in ("cam_npy", "cam_png")]) == 2 * n_ids
    # prototypes.pt is re-aggregated from proto_stats/ on every run: its values, not its mtime, must stay
    prototypes = torch.load(work / "fusion" / "prototypes.pt")["prototypes"]
    del before["fusion"][work / "fusion" / "prototypes.pt"]

    assert train_cls.run(cfg) == results["final_cls"]
    assert gen_fusion.run(cfg)["miou"] == pytest.approx(results["fusion"]["miou"])
    assert train_fusion.run(cfg) == results["final_fusion"]
    gen_pm.run(cfg)

    def new_log(stage):
        text = (work / stage / "log.txt").read_text()
        assert text.startswith(logs[stage])
        return text[len(logs[stage]):]

    # the finished trainings say so and do not train again (no new iteration logged)
    for stage in ("train_cls", "train_fusion"):
        added = new_log(stage)
        assert f"{work / stage / 'final.pth'} exists: training already finished" in added, added
        assert "iter " not in added.lower() and "resumed from" not in added
    # every image of the inference list was found finished
    assert f"{n_ids} of {n_ids} images already done (skipped)" in new_log("fusion")
    # and nothing was rewritten: weights, checkpoints, maps, PNGs, prototypes (the eval reports may be rewritten)
    for stage in stages:
        after = _mtimes(work / stage)
        keep = {p: t for p, t in before[stage].items() if "eval" not in p.parts}
        assert set(after) >= set(keep), stage
        rewritten = [str(p.relative_to(work)) for p, t in keep.items() if after[p] != t]
        assert rewritten == [], rewritten
    assert torch.equal(torch.load(work / "fusion" / "prototypes.pt")["prototypes"], prototypes)


@pytest.mark.parametrize("stage", ["train_cls", "train_fusion"])
def test_resumed_run_ends_with_the_same_weights(pipeline, tiny_voc, tmp_path, stage):
    cfg, _ = pipeline
    from pathlib import Path

    done = Path(cfg.work_dir) / stage
    resumed_cfg = tiny_cfg(tiny_voc, tmp_path)
    # an interrupted run: only the iteration-2 checkpoint of the same run survives
    (tmp_path / stage / "checkpoints").mkdir(parents=True)
    shutil.copy(done / "checkpoints" / "iter_0000002.pth", tmp_path / stage / "checkpoints")
    if stage == "train_fusion":
        for extra in ("train_cls", "fusion"):
            shutil.copytree(Path(cfg.work_dir) / extra, tmp_path / extra)
        final = train_fusion.run(resumed_cfg)
        _assert_same_weights(_weights(final), _weights(done / "final.pth"))
        _assert_same_weights(_weights(tmp_path / stage / "final_teacher.pth"), _weights(done / "final_teacher.pth"))
    else:
        final = train_cls.run(resumed_cfg)
        _assert_same_weights(_weights(final), _weights(done / "final.pth"))
    assert "resumed from" in (tmp_path / stage / "log.txt").read_text()


def test_stage0_loss_falls_on_a_fixed_batch(tiny_voc, tmp_path):
    from smaf.config import Config
    from smaf.data.transforms import JointTrainTransform
    from smaf.data.voc import ClassificationDataset, VOCLayout, collate_train
    from smaf.models import build_model
    from smaf.methods import get_method
    from smaf.optim import build_poly_sgd

    cfg = tiny_cfg(tiny_voc, tmp_path)
    layout = VOCLayout.from_config(cfg)
    ids = layout.read_list(cfg.data.train_list)[:4]
    dataset = ClassificationDataset(layout, ids, JointTrainTransform(64, (56, 96), jitter=(0.3, 0.3, 0.3, 0.1)),
                                    saliency=True)
    batch = collate_train([dataset[(i, 100 + i)] for i in range(4)])
    torch.manual_seed(0)
    model = build_model(Config(dict(cfg.model, head="smaf")), layout.num_classes).train()
    optimizer = build_poly_sgd(model.param_groups(), lr=0.01, weight_decay=5e-4, momentum=0.0, max_step=1000)
    step = get_method("eps").make_step(cfg.train_cls.eps, layout.num_classes, torch.device("cpu"))
    losses = []
    for it in range(30):
        loss, _ = step(model, batch, it)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def _expected_divisor(cam: torch.Tensor, labels: torch.Tensor, c: int) -> float:
    """The stated rule, computed apart: the mean over the labelled (image, class) pairs of the class's peak CAM
    logit, at least 1."""
    peaks = [float(cam[b, k].max()) for b in range(cam.shape[0]) for k in range(c) if labels[b, k] > 0]
    return max(1.0, sum(peaks) / max(1, len(peaks)))


def _check_calibrated(rows_before, cam_before, rows_after, cam_after, divisor, c, how):
    """The background row starts at zero and the class logits are the old ones divided by ``divisor``."""
    assert torch.equal(rows_after[c], torch.zeros_like(rows_after[c]))           # background row exactly zero
    assert torch.equal(cam_after[:, c], torch.zeros_like(cam_after[:, c]))       # so its logit is 0 everywhere
    torch.testing.assert_close(cam_after[:, :c], cam_before[:, :c] / divisor, rtol=1e-4, atol=1e-5)
    if how == "weights":   # the class rows themselves divided
        torch.testing.assert_close(rows_after[:c], rows_before[:c] / divisor, rtol=1e-6, atol=0)
    else:                  # the rows untouched, a fixed scale on the logits
        assert torch.equal(rows_after[:c], rows_before[:c])


def test_cam_loss_model_gets_a_background_channel_in_stage2(tiny_voc, tmp_path, monkeypatch):
    cfg = tiny_cfg(tiny_voc, tmp_path, "train_cls.method=cam", "train_cls.iterations=2", "train_fusion.iterations=2",
                   "inference.scales=[1.0]", "inference.flip=false", "train_fusion.bg_bias=false")
    train_cls.run(cfg)
    model, spec = load_model(tmp_path / "train_cls" / "final.pth")
    assert spec["args"]["head"] == "cls" and model.num_outputs == 5
    c = model.num_classes
    gen_fusion.run(cfg)
    # two iterations leave the mean peak of the labelled classes below 1 (divisor clamped to 1, a division
    # nobody could see): give the stage-0 classifier the positive logits of tens that a trained one has at its
    # objects (the features are post-ReLU, so non-negative rows give non-negative CAMs)
    stage0 = tmp_path / "train_cls" / "final.pth"
    ckpt = read_checkpoint(stage0)
    ckpt["model"]["classifier.weight"] = ckpt["model"]["classifier.weight"].abs() * 10.0
    torch.save(ckpt, stage0)
    model, _ = load_model(stage0)

    seen = {}
    real_calibrate = train_fusion.calibrate_background_head

    def recording_calibrate(net, images, labels, how="weights"):
        with torch.no_grad():
            seen.update(rows_before=net.classifier.weight.detach().clone(), cam_before=net(images)[1].clone(),
                        images=images.clone(), labels=labels.clone(), how=how, scale_before=net.logit_scale)
            divisor = real_calibrate(net, images, labels, how)
            seen.update(rows_after=net.classifier.weight.detach().clone(), cam_after=net(images)[1].clone(),
                        divisor=divisor, scale_after=net.logit_scale)
        return divisor

    monkeypatch.setattr(train_fusion, "calibrate_background_head", recording_calibrate)
    student, spec2 = load_model(train_fusion.run(cfg))
    assert spec2["args"]["head"] == "smaf" and student.num_outputs == 6 and student.classifier.weight.shape[0] == 6
    # the calibration (config default: calibration=weights) ran once, on the stage-0 model with a new background row
    assert seen["how"] == "weights" and seen["rows_before"].shape[0] == c + 1
    assert torch.equal(seen["rows_before"][:c], model.classifier.weight.detach())   # the C rows kept from stage 0
    divisor = seen["divisor"]
    assert divisor == pytest.approx(_expected_divisor(seen["cam_before"], seen["labels"], c), rel=1e-5)
    assert divisor > 1.5, "the stage-0 CAM peaks are too small for the division to be seen"
    _check_calibrated(seen["rows_before"], seen["cam_before"], seen["rows_after"], seen["cam_after"], divisor, c,
                      "weights")
    assert seen["scale_before"] == seen["scale_after"] == 1.0 and spec2["args"].get("logit_scale", 1.0) == 1.0
    assert f"divided the class rows by the mean peak CAM {divisor:.2f}" in (tmp_path / "train_fusion" /
                                                                            "log.txt").read_text()

    # calibration=scale on the same stage-0 model and batch: the weights stay, the logits get a fixed 1/divisor
    scaled, _ = load_model(tmp_path / "train_cls" / "final.pth")
    scaled.add_background_channel()
    scaled.eval()
    with torch.no_grad():
        rows_before, cam_before = scaled.classifier.weight.detach().clone(), scaled(seen["images"])[1]
        scale_divisor = real_calibrate(scaled, seen["images"], seen["labels"], "scale")
        cam_after = scaled(seen["images"])[1]
    assert scale_divisor == pytest.approx(divisor, rel=1e-5)
    assert scaled.logit_scale == pytest.approx(1.0 / divisor, rel=1e-6)
    assert scaled.arch_spec["args"]["logit_scale"] == scaled.logit_scale   # checkpoints rebuild the scale
    _check_calibrated(rows_before, cam_before, scaled.classifier.weight.detach(), cam_after, divisor, c, "scale")


def test_missing_stage_outputs_give_one_line_errors(tiny_voc, tmp_path):
    import subprocess
    import sys

    lst = f"{tiny_voc}/ImageSets/Segmentation/train.txt"
    cmd = [sys.executable, "-m", "smaf.stages.gen_fusion", "--config", "demo", f"work_dir={tmp_path}",
           f"data.root={tiny_voc}", f"data.train_list={lst}", f"data.infer_list={lst}"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert "train_cls" in out.stderr.strip().splitlines()[-1] and "error:" in out.stderr
    out = subprocess.run([sys.executable, "-m", "smaf.stages.train_cls", "--config", "demo",
                          f"data.root={tmp_path}/nowhere"], capture_output=True, text=True)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0 and "dataset/README.md" in last and "Traceback" not in out.stderr


def test_ema_and_prototype_updates():
    torch.manual_seed(0)
    student, teacher = torch.nn.Conv2d(2, 3, 1), torch.nn.Conv2d(2, 3, 1)
    bn_s, bn_t = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    bn_s.running_mean.fill_(2.0)
    expected = 0.9 * teacher.weight.detach() + 0.1 * student.weight.detach()
    ema_update(teacher, student, 0.9)
    assert torch.allclose(teacher.weight, expected)
    ema_update(bn_t, bn_s, 0.9)
    assert torch.equal(bn_t.running_mean, bn_s.running_mean)  # buffers are copied, not averaged

    bank = PrototypeBank(torch.zeros(3, 2), momentum=0.5, min_pixels=1)
    # C = 2 classes + background; teacher cam makes class 0 win the left column, background the right
    cam = torch.tensor([[[[5.0, -5.0]], [[0.0, 0.0]], [[0.0, 5.0]]]])          # (1, 3, 1, 2)
    feature = torch.tensor([[[[1.0, 3.0]], [[2.0, 4.0]]]])                      # (1, 2, 1, 2)
    sums, counts = bank.batch_class_means(cam, feature, torch.tensor([[1.0, 0.0]]))
    assert counts.tolist() == [1, 0, 1]
    bank.update(sums, counts)
    assert bank.prototypes.tolist() == [[0.5, 1.0], [0.0, 0.0], [1.5, 2.0]]


def test_crf_improves_a_noisy_two_region_labelling():
    rng = np.random.default_rng(0)
    image = np.full((60, 90, 3), 40, np.uint8)
    image[15:45, 30:70] = (200, 60, 60)
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((60, 90), np.uint8)
    truth[15:45, 30:70] = 3
    noisy = truth.copy()
    flips = rng.random(truth.shape) < 0.2
    noisy[flips] = np.where(truth[flips] == 3, 0, 3)
    refined = crf_refine_labels(image, noisy, CRFParams())
    assert (refined == truth).mean() > (noisy == truth).mean() + 0.15
    assert (refined == truth).mean() > 0.97   # the rectangle keeps its shape
    assert set(np.unique(refined)) <= {0, 3}


def test_crf_pool_writes_what_one_worker_writes(tiny_voc, tmp_path):
    """The pool (largest images first, out of order) gives every image exactly the single-worker result."""
    from smaf.data.voc import VOCLayout
    from smaf.io import image_area, load_label_png

    layout = VOCLayout(tiny_voc)
    ids = layout.read_list(tiny_voc / "ImageSets" / "Segmentation" / "train.txt")
    assert len({image_area(layout.image_path(i)) for i in ids}) > 3   # sizes differ, so the order matters
    rng = np.random.default_rng(0)
    noisy = tmp_path / "noisy"
    noisy.mkdir()
    for i in ids:   # the true masks with 20% of the pixels set to background
        mask = layout.load_mask(i).copy()
        mask[(rng.random(mask.shape) < 0.2) & (mask != 255)] = 0
        mask[mask == 255] = 0
        Image.fromarray(mask).save(noisy / f"{i}.png")
    params = CRFLabelRefiner(CRFParams())
    assert refine_folder(layout, noisy, tmp_path / "one", ids, params, 1) == len(ids)
    assert refine_folder(layout, noisy, tmp_path / "pool", ids, params, 2) == len(ids)
    for i in ids:
        np.testing.assert_array_equal(load_label_png(tmp_path / "pool" / f"{i}.png"),
                                      load_label_png(tmp_path / "one" / f"{i}.png"))
    assert refine_folder(layout, noisy, tmp_path / "pool", ids, params, 2) == 0   # finished: skipped


def test_pipeline_runner_measures_every_stage(tiny_voc, tmp_path):
    from smaf.pipeline import format_summary, run_pipeline

    cfg = tiny_cfg(tiny_voc, tmp_path, "train_cls.iterations=2", "train_fusion.iterations=2",
                   "train_cls.val_every=0", "train_fusion.val_every=0", "inference.scales=[0.5,1.0]")
    import json
    import time

    logged = []
    start = time.perf_counter()
    summary = run_pipeline(cfg, denoise_variants=[False, True], figure_rows=2, log=logged.append)
    wall = time.perf_counter() - start
    assert summary["methods"] == ["eps"] and list(summary["paths"]) == ["eps"]
    path = summary["paths"]["eps"]
    assert set(path["miou"]) == {"train", "val"}
    row = path["miou"]["val"]
    assert set(row) == {"single-scale CAM", "fused multi-scale CAM", "self-trained (denoise off)",
                        "self-trained (denoise on)", "self-trained (denoise off) + CRF"}
    assert all(0.0 <= v <= 100.0 for v in row.values())
    timings = summary["timings_s"]
    assert list(timings) == [
        "saliency maps (train + val)", "stage 0: train classifier",
        "stage 1 single + multi-scale (train)", "stage 1 single + multi-scale (val)",   # one run: 1.0 is a scale
        "stage 2: self-training (denoise_off)", "stage 3: pseudo masks + CRF (denoise_off, train)",
        "stage 3: pseudo masks + CRF (denoise_off, val)", "stage 2: self-training (denoise_on)",
        "stage 3: pseudo masks (denoise_on, train)", "stage 3: pseudo masks (denoise_on, val)",
        "fixed-score comparison"]
    # each stage that trains or runs inference took measurable time (the saliency maps of the tiny set may be
    # reused and the rescoring of saved maps is fast: 0.0 there is right); together they fit in the wall time
    # of the call (0.05 s rounding each), which the summary measures too
    assert all(t > 0 for k, t in timings.items() if not k.startswith(("saliency", "fixed"))), timings
    assert sum(timings.values()) <= wall + 0.05 * len(timings), (timings, wall)
    assert summary["total_s"] == round(sum(timings.values()), 1)
    assert summary["total_s"] - 0.05 * len(timings) <= summary["wall_s"] <= wall + 0.05
    # the single-scale column is the scale-1.0 pass of the multi-scale run, in its own folder
    single_cfg = load_config(str(tmp_path / "fusion_single_val" / "config.yaml"))
    assert list(single_cfg.inference.scales) == [1.0] and single_cfg.inference.flip is False
    assert path["folders"]["val"]["single-scale CAM"] == str(tmp_path / "fusion_single_val")
    # stage 0 ran without periodic validation (stage 1 scores its final model): no validation metrics
    assert load_config(str(tmp_path / "train_cls" / "config.yaml")).train_cls.val_every == 0
    assert json.loads((tmp_path / "timings.json").read_text()) == timings   # what a rerun keeps
    for name, t in timings.items():
        assert f"== {name}: {t:.1f} s" in logged, name
    table = format_summary(summary)
    assert "| val |" in table and "per-image Otsu" in table and "no ground truth" in table
    # the demo config's per-image rule is set beside the fixed score, on the same saved maps (no CRF there)
    assert summary["bg_method"] == "otsu"
    fixed = path["miou_fixed"]["val"]
    assert set(fixed) == set(row) - {"self-trained (denoise off) + CRF"}
    assert "| val, fixed 0.20 (comparison) |" in table
    from smaf.data.voc import VOCLayout
    from smaf.evaluate import evaluate_folder

    layout = VOCLayout.from_config(cfg)
    direct = evaluate_folder(tmp_path / "fusion_val" / "cam_npy", layout.mask_dir,
                             layout.read_list(cfg.data.val_list), ["background"] + layout.class_names,
                             bg_threshold=0.2)["miou"]
    assert fixed["fused multi-scale CAM"] == pytest.approx(direct)
    scores = path["bg_scores"]["val"]["fused multi-scale CAM"]
    assert 0 < scores["p10"] <= scores["median"] <= scores["p90"] < 1
    fixed_rule = dict(summary, bg_method="fixed", paths={"eps": dict(path, miou_fixed={})})
    assert "background threshold 0.20 (fixed by the config, not tuned on ground truth)" in format_summary(fixed_rule)
    assert (tmp_path / "summary.json").is_file() and (tmp_path / "summary.md").read_text() == table
    assert (tmp_path / "figure.jpg").is_file()
    # the variants trained separately, the CRF ran only for the config's default setting (denoise off)
    assert (tmp_path / "train_fusion_denoise_on" / "final.pth").is_file()
    assert (tmp_path / "pseudo_masks_denoise_off_val" / "crf_png").is_dir()
    assert not (tmp_path / "pseudo_masks_denoise_on_val" / "crf_png").exists()


def test_pipeline_clock_keeps_the_time_measured_when_a_step_ran(tmp_path):
    """A step that returns in under a fifth of its recorded time reused its outputs: the recorded time stays."""
    import json
    import time

    from smaf.pipeline import _Clock

    (tmp_path / "timings.json").write_text(json.dumps({"reused": 5.0, "rerun": 0.1}))
    logged = []
    clock = _Clock(tmp_path / "timings.json", logged.append)
    assert clock("reused", lambda x: x + 1, 1) == 2
    clock("rerun", time.sleep, 0.3)      # slower than recorded: measured again
    clock("new", time.sleep, 0.2)
    assert clock.timings["reused"] == 5.0
    assert 0.3 <= clock.timings["rerun"] <= 1.5 and 0.2 <= clock.timings["new"] <= 1.5
    assert logged[0] == "== reused: 5.0 s (measured when it ran; outputs reused now)"
    assert logged[1] == f"== rerun: {clock.timings['rerun']:.1f} s"
    assert json.loads((tmp_path / "timings.json").read_text()) == clock.timings


#: A tiny stage 4 (a few iterations at a small crop, single-scale inference + CRF) for the runner's tests.
TINY_SEG = ("train_seg.crop=48", "train_seg.base_long=64", "train_seg.scale_range=[1.0,1.0]", "train_seg.batch_size=2",
            "train_seg.iterations=2", "train_seg.ckpt_every=0", "train_seg.val_every=0", "train_seg.log_every=1",
            "infer_seg.base_long=64", "infer_seg.scales=[1.0]", "infer_seg.flip=false", "infer_seg.crf_workers=1",
            "infer_seg.overlays=1")


@pytest.mark.cost(41)
def test_pipeline_runner_adds_stage4_and_its_fully_supervised_twin_once(tiny_voc, tmp_path, monkeypatch):
    import json

    import yaml

    from smaf.pipeline import _Clock, format_summary, run_pipeline, segmentation_step

    cfg = tiny_cfg(tiny_voc, tmp_path, "train_cls.iterations=2", "train_fusion.iterations=2",
                   "train_cls.val_every=0", "train_fusion.val_every=0", "inference.scales=[1.0]",
                   "inference.flip=false", *TINY_SEG)
    summary = run_pipeline(cfg, figure_rows=1, log=lambda _: None, methods=["cam", "eps"], segmentation=True)
    seg = summary["segmentation"]
    assert set(seg) == {"network", "pseudo", "gt", "ratio"} and list(seg["pseudo"]) == ["cam", "eps"]
    for result in [seg["gt"], *seg["pseudo"].values()]:
        assert 0.0 <= result["miou"] <= 100.0 and 0.0 <= result["miou_crf"] <= 100.0
    for m, ratio in seg["ratio"].items():
        for key in ("miou", "miou_crf"):
            assert ratio[key] == pytest.approx(seg["pseudo"][m][key] / seg["gt"][key], abs=1e-4)
    # timed by the runner: train + val inference per path, and the twin once (not per path)
    stage4 = [k for k in summary["timings_s"] if "stage 4" in k]
    assert len(stage4) == 2 * 2 + 2 and sum("fully supervised twin" in k for k in stage4) == 2
    assert not any("stage 4" in w for w in summary["warnings"])   # the paths' stage 4 = the twin's settings
    # folders: each path's network in its own work_dir, trained on that path's final (CRF) train masks
    val_ids = (tiny_voc / "ImageSets/Segmentation/val.txt").read_text().split()
    for m in ("cam", "eps"):
        train_dir, infer_dir = tmp_path / m / "train_seg", tmp_path / m / "infer_seg"
        assert seg["pseudo"][m]["train_dir"] == str(train_dir) and (train_dir / "final.pth").is_file()
        saved = yaml.safe_load((train_dir / "config.yaml").read_text())["train_seg"]
        assert saved["masks"] == "pseudo"
        assert saved["mask_dir"] == str(tmp_path / m / "pseudo_masks_denoise_off_train" / "crf_png")
        for sub in ("seg_png", "crf_png"):
            assert sorted(p.stem for p in (infer_dir / sub).glob("*.png")) == sorted(val_ids)
        assert not (tmp_path / m / "train_seg_gt").exists()
    assert (tmp_path / "train_seg_gt" / "final.pth").is_file()
    assert yaml.safe_load((tmp_path / "train_seg_gt" / "config.yaml").read_text())["train_seg"]["masks"] == "gt"
    assert (tmp_path / "infer_seg_gt" / "eval" / "crf_png.json").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["segmentation"] == seg
    table = format_summary(summary)
    assert (tmp_path / "summary.md").read_text() == table
    for row in ("| trained on our pseudo masks (cam path) |", "| trained on our pseudo masks (eps path) |",
                "| trained on ground truth (fully supervised) |", "| ratio pseudo / ground truth (eps path) |"):
        assert row in table
    assert "share of the fully supervised val mIoU" in table and "| stage 4: val mIoU (%) | network | + CRF |" in table
    one = dict(summary, paths={"eps": summary["paths"]["eps"]},
               segmentation=dict(seg, pseudo={"eps": seg["pseudo"]["eps"]}, ratio={"eps": seg["ratio"]["eps"]}))
    assert "| trained on our pseudo masks |" in format_summary(one)
    assert "Stage 4, the segmentation network" not in format_summary(dict(summary, segmentation=None))
    # a rerun skips finished work: the twin's weights stay, its val images are not segmented again
    final = tmp_path / "train_seg_gt" / "final.pth"
    before = final.stat().st_mtime_ns
    again = segmentation_step(cfg, _Clock(tmp_path / "timings.json", lambda _: None), "gt")
    assert final.stat().st_mtime_ns == before and again["miou"] == pytest.approx(seg["gt"]["miou"])
    log = (tmp_path / "infer_seg_gt" / "log.txt").read_text()
    assert f"{len(val_ids)} of {len(val_ids)} images already done" in log
    # the command-line flag reaches run_pipeline
    assert _run_pipeline_kwargs(monkeypatch, ["--config", "demo", "--segmentation",
                                              f"work_dir={tmp_path / 'cli'}"])["segmentation"] is True


def test_reused_outputs_made_under_another_config_are_flagged(tiny_voc, tmp_path):
    from smaf.runtime import prepare_output

    log_file = tmp_path / "fusion" / "log.txt"
    prepare_output(tiny_cfg(tiny_voc, tmp_path), "fusion", "gen_fusion")
    prepare_output(tiny_cfg(tiny_voc, tmp_path), "fusion", "gen_fusion")
    assert "differs" not in log_file.read_text()          # same settings: a plain resume
    prepare_output(tiny_cfg(tiny_voc, tmp_path, "inference.bg_method=fixed"), "fusion", "gen_fusion")
    warning = [ln for ln in log_file.read_text().splitlines() if "differs" in ln]
    assert len(warning) == 1 and "inference.bg_method: 'otsu' -> 'fixed'" in warning[0]
    assert str(tmp_path / "fusion") in warning[0]


def test_path_overrides_apply_to_their_path_only_and_fail_before_any_work(tiny_voc, tmp_path, monkeypatch):
    import smaf.pipeline as pipeline_module
    from smaf.config import ConfigError

    seen = {}

    def fake_run_path(path_cfg, clock, denoise_variants, prefix="", refiners=(), cams_only=False):
        seen[path_cfg.train_cls.method] = (path_cfg.train_fusion.lr, path_cfg.work_dir)
        raise RuntimeError("stop after recording")   # no real stage work in this test

    monkeypatch.setattr(pipeline_module, "run_path", fake_run_path)
    cfg = tiny_cfg(tiny_voc, tmp_path, "pipeline.path_overrides.eps=[train_fusion.lr=0.0003]")
    with pytest.raises(RuntimeError, match="stop after recording"):
        pipeline_module.run_pipeline(cfg, methods=["eps", "cam"], log=lambda _: None)
    assert seen == {"eps": (0.0003, str(tmp_path / "eps"))}
    seen.clear()
    cfg = tiny_cfg(tiny_voc, tmp_path, "pipeline.path_overrides.cam=[train_fusion.lr=0.0003]")
    with pytest.raises(RuntimeError):
        pipeline_module.run_pipeline(cfg, methods=["cam", "eps"], log=lambda _: None)
    assert seen == {"cam": (0.0003, str(tmp_path / "cam"))}
    # a key that does not exist fails with the config's one-line error before the saliency step or stage 0
    cfg = tiny_cfg(tiny_voc, tmp_path / "bad", "pipeline.path_overrides.eps=[train_fusion.no_such_key=1]")
    with pytest.raises(ConfigError, match="train_fusion.no_such_key"):
        pipeline_module.run_pipeline(cfg, methods=["cam", "eps"], log=lambda _: None)
    assert not (tmp_path / "bad").exists()


def test_refiner_rows_chain_each_source_and_stage4_trains_on_the_end_of_the_chain(tiny_voc, tmp_path, monkeypatch):
    """refine_rows wires every refiner to the right inputs (faked stages record them), records the folders of its
    columns, and the stage-4 mask choice follows the longest chain that ran, in folders of its own."""
    from pathlib import Path

    from smaf.pipeline import FUSED, SEG_DIRS, SEG_DIRS_RW, _Clock, refine_rows, segmentation_table, stage4_masks
    from smaf.stages import crf, par, random_walk, train_aff

    calls = []

    def fake(name, value):
        def run(cfg):
            calls.append((name, cfg))
            return value(cfg)
        return run

    monkeypatch.setattr(train_aff, "run", fake("aff", lambda c: tmp_path / "train_aff" / "final.pth"))
    monkeypatch.setattr(par, "run", fake("par", lambda c: {"miou": 1.0, "out_dir": tmp_path / c.par.out_subdir}))
    monkeypatch.setattr(random_walk, "run", fake("rw", lambda c: {"miou": 2.0,
                                                                "out_dir": tmp_path / c.random_walk.out_subdir}))
    monkeypatch.setattr(crf, "run", fake("crf", lambda c: {"miou": 3.0, "output_dir": Path(c.crf.input_dir).parent}))
    cfg = tiny_cfg(tiny_voc, tmp_path)
    default = "self-trained (denoise off)"
    out = {"miou": {"train": {}, "val": {}}, "default_column": default,
           "folders": {s: {FUSED: tmp_path / f"fused_{s}", default: tmp_path / f"st_{s}",
                           default + " + CRF": tmp_path / f"st_{s}"} for s in ("train", "val")}}
    # before any refiner: stage 3's CRF masks, in stage 4's usual folders
    assert stage4_masks(out) == (default + " + CRF", tmp_path / "st_train" / "crf_png", SEG_DIRS["pseudo"])
    lists = {"train": ("train.txt", "infer.txt"), "val": ("val.txt", "val.txt")}
    refine_rows(cfg, _Clock(tmp_path / "timings.json", lambda _: None), out, lists, ["par", "rw"])
    # AffinityNet once, on the fused maps of the training list; then per split and source PAR, RW, CRF after RW
    assert [n for n, _ in calls] == ["aff"] + ["par", "rw", "crf"] * 4
    assert calls[0][1].train_aff.cam_dir == str(tmp_path / "fused_train" / "cam_npy")
    assert calls[0][1].train_aff.train_list == "train.txt"
    walks = [c for n, c in calls if n == "rw"]
    assert [c.random_walk.cam_dir for c in walks] == [str(tmp_path / f"{src}_{s}" / "cam_npy")
                                                     for s in ("train", "val") for src in ("fused", "st")]
    assert {c.random_walk.checkpoint for c in walks} == {str(tmp_path / "train_aff" / "final.pth")}
    assert [c.random_walk.eval_list for c in walks] == ["infer.txt", "infer.txt", "val.txt", "val.txt"]
    crfs = [c for n, c in calls if n == "crf"]
    assert crfs[1].crf.input_dir == str(tmp_path / "rw_self_trained_train" / "cam_png")
    for s in ("train", "val"):
        assert out["miou"][s][f"{default} + PAR"] == 1.0 and out["miou"][s][f"{FUSED} + RW"] == 2.0
        assert out["miou"][s][f"{default} + RW + CRF"] == 3.0
        assert out["folders"][s][f"{default} + RW + CRF"] == tmp_path / f"rw_self_trained_{s}"
    # stage 4 now trains on the self-trained + RW + CRF masks of the training list
    assert stage4_masks(out) == (default + " + RW + CRF", tmp_path / "rw_self_trained_train" / "crf_png", SEG_DIRS_RW)
    assert SEG_DIRS_RW[0] != SEG_DIRS["pseudo"][0] and SEG_DIRS_RW[1] != SEG_DIRS["pseudo"][1]
    # the stage-4 table says which masks it trained on and quotes those masks' own val score
    out["miou"]["val"][default + " + CRF"] = 9.0
    result = {"miou": 0.5, "miou_crf": 0.6, "masks": default + " + RW + CRF"}
    summary = {"paths": {"cam": out}, "segmentation": {"network": "n", "pseudo": {"cam": result},
                                                        "gt": {"miou": 0.8, "miou_crf": 0.9},
                                                        "ratio": {"cam": {"miou": 0.625, "miou_crf": 0.6667}}}}
    text = "\n".join(segmentation_table(summary))
    assert f"the '{default} + RW + CRF' masks" in text and "themselves score 3.00 on val" in text
    assert "| ratio pseudo / ground truth | 62.5% | 66.7% |" in text


def test_cams_only_stops_each_path_after_stage1_and_times_each_path(tiny_voc, tmp_path, monkeypatch):
    """--cams-only (the method axis): every path runs stages 0 and 1 only, the table has the single-scale and fused
    columns, and each path's wall time is the sum of its own steps; refiners or stage 4 with it fail before work.
    SC-CAM's round 0 (a plain cam classifier of the same settings) is the cam path's network, not trained again."""
    import yaml

    from smaf.config import derive
    from smaf.pipeline import FUSED, SINGLE, format_summary, run_pipeline, share_sc_cam_round0

    cfg = tiny_cfg(tiny_voc, tmp_path, "train_cls.iterations=2", "train_cls.val_every=0", "inference.scales=[1.0]",
                   "inference.flip=false", "train_cls.sc_cam.rounds=1", "train_cls.sc_cam.num_subcategories=2",
                   "train_cls.sc_cam.kmeans_n_init=1")
    for extra in ({"refiners": ["par"]}, {"segmentation": True}):
        with pytest.raises(ValueError, match="--cams-only stops after stage 1"):
            run_pipeline(cfg, log=lambda _: None, methods=["cam", "sc_cam"], cams_only=True, **extra)
    assert not (tmp_path / "cam").exists()                    # failed before any work
    logged = []
    summary = run_pipeline(cfg, figure_rows=1, log=logged.append, methods=["cam", "sc_cam"], cams_only=True)
    for m in ("cam", "sc_cam"):
        path = summary["paths"][m]
        assert path["default_column"] == FUSED
        assert all(list(path["miou"][s]) == [SINGLE, FUSED] for s in ("train", "val"))
        assert (tmp_path / m / "train_cls" / "final.pth").is_file() and (tmp_path / m / "fusion").is_dir()
        assert not list((tmp_path / m).glob("train_fusion*")) and not list((tmp_path / m).glob("pseudo_masks*"))
        own = [v for k, v in summary["timings_s"].items() if k.startswith(f"{m}: ")]
        # stage 0, stage 1 (single + multi-scale) on train and on val, the fixed-score comparison
        assert len(own) == 4 and summary["path_s"][m] == pytest.approx(sum(own), abs=0.11)
    table = format_summary(summary)
    assert "| path | wall time (s) |" in table and f"| sc_cam | {summary['path_s']['sc_cam']:.1f} |" in table
    assert f"| mIoU (%) | {SINGLE} | {FUSED} |" in table
    # round 0 of SC-CAM: the cam path's final.pth (no round_0 folder trained), and the log says so
    cam_final = tmp_path / "cam" / "train_cls" / "final.pth"
    assert not (tmp_path / "sc_cam" / "train_cls" / "round_0").exists()
    saved = yaml.safe_load((tmp_path / "sc_cam" / "train_cls" / "round_1" / "config.yaml").read_text())
    assert saved["train_cls"]["sc_cam"]["initial_checkpoint"] == str(cam_final)
    assert any("round 0 is the cam path's classifier" in line for line in logged)
    # other settings than the cam path's (or a checkpoint set by the user): round 0 stays the path's own
    sc = derive(cfg, train_cls__method="sc_cam", work_dir=str(tmp_path / "x"))
    cam = derive(cfg, train_cls__method="cam", work_dir=str(tmp_path / "cam"))
    assert share_sc_cam_round0(sc, cam, log=lambda _: None).train_cls.sc_cam.initial_checkpoint == str(cam_final)
    assert share_sc_cam_round0(sc, derive(cam, train_cls__lr=0.5), log=lambda _: None) is sc
    own_start = derive(sc, train_cls__sc_cam__initial_checkpoint="mine.pth")
    assert share_sc_cam_round0(own_start, cam, log=lambda _: None).train_cls.sc_cam.initial_checkpoint == "mine.pth"
    # the command-line flag reaches run_pipeline
    seen = _run_pipeline_kwargs(monkeypatch, ["--config", "demo", "--cams-only", "--methods", "seam",
                                              f"work_dir={tmp_path / 'cli'}"])
    assert seen["cams_only"] is True and seen["methods"] == ["seam"]


def test_the_a2gnn_refiner_trains_its_gated_affinity_net_once_and_adds_image_and_box_rows(tiny_voc, tmp_path,
                                                                                          monkeypatch):
    """--refiners a2gnn: one AffinityNet with A2GNN's objective on the fused train maps (its own folder), A2GNN
    from each source's maps on both lists (preset image), and per list the box row (preset box, tight boxes of the
    masks, with the config's own box schedule); the summary puts them in the refiners table."""
    from pathlib import Path

    from smaf.pipeline import A2GNN_SUFFIX, BOX_A2GNN, FUSED, _Clock, format_summary, refine_rows
    from smaf.stages import a2gnn, train_aff

    calls = []
    monkeypatch.setattr(train_aff, "run", lambda c: calls.append(("aff", c)) or Path(tmp_path / "gated" / "final.pth"))
    monkeypatch.setattr(a2gnn, "run", lambda c: calls.append(("a2gnn", c)) or
                        {"miou": 5.0 if c.a2gnn.preset == "box" else 4.0, "out_dir": tmp_path / c.a2gnn.out_subdir})
    cfg = tiny_cfg(tiny_voc, tmp_path)
    default = "self-trained (denoise off)"
    out = {"miou": {"train": {}, "val": {}}, "default_column": default,
           "folders": {s: {FUSED: tmp_path / f"fused_{s}", default: tmp_path / f"st_{s}",
                           default + " + CRF": tmp_path / f"st_{s}"} for s in ("train", "val")}}
    lists = {"train": ("train.txt", "infer.txt"), "val": ("val.txt", "val.txt")}
    refine_rows(cfg, _Clock(tmp_path / "timings.json", lambda _: None), out, lists, ["a2gnn"])
    assert [n for n, _ in calls] == ["aff"] + ["a2gnn"] * 6
    aff = calls[0][1].train_aff
    assert aff.objective == "a2gnn" and aff.out_subdir == "train_aff_a2gnn"
    assert aff.cam_dir == str(tmp_path / "fused_train" / "cam_npy") and aff.train_list == "train.txt"
    steps = [c.a2gnn for _, c in calls[1:]]
    assert {s.checkpoint for s in steps} == {str(tmp_path / "gated" / "final.pth")}
    image = [s for s in steps if s.preset == "image"]
    assert [s.cam_dir for s in image] == [str(tmp_path / f"{src}_{sp}" / "cam_npy")
                                          for sp in ("train", "val") for src in ("fused", "st")]
    assert [s.eval_list for s in image] == ["infer.txt", "infer.txt", "val.txt", "val.txt"]
    boxes = [s for s in steps if s.preset == "box"]
    assert [(s.box_dir, s.list, s.out_subdir) for s in boxes] == [("masks", "infer.txt", "a2gnn_box_train"),
                                                                  ("masks", "val.txt", "a2gnn_box_val")]
    assert boxes[0].box.epochs == 20                          # demo.yaml's box schedule, not the file's 150
    for s in ("train", "val"):
        assert out["miou"][s][default + A2GNN_SUFFIX] == 4.0 and out["miou"][s][FUSED + A2GNN_SUFFIX] == 4.0
        assert out["miou"][s][BOX_A2GNN] == 5.0
        assert out["folders"][s][BOX_A2GNN] == tmp_path / f"a2gnn_box_{s}"
    out["miou"]["train"].update({FUSED: 1.0, default: 2.0, default + " + CRF": 3.0})
    summary = {"paths": {"cam": out}, "timings_s": {}, "total_s": 0.0, "backbone": "b", "bg_method": "fixed",
               "bg_threshold": 0.2}
    text = format_summary(summary)
    refiners = text.split("Refiners (same maps")[1]
    assert f"{default} + CRF | {FUSED} + A2GNN | {default} + A2GNN | {BOX_A2GNN} |" in refiners
    assert f"| mIoU (%) | {FUSED} | {default} | {default} + CRF |" in text.split("Refiners")[0]


def test_subset_scores_every_column_on_ids_spread_over_each_list_and_refines_only_those(tiny_voc, tmp_path,
                                                                                         monkeypatch):
    """--subset N: N ids spread evenly over data.infer_list and data.val_list (the ends included, list order kept),
    written once under the work dir; every stage and refiner of the run sees them as its evaluation lists (the
    refiners also as the ids to make), stages 0 and 2 keep data.train_list; the summary says so first; with
    --segmentation (stage 4 needs the whole training list) it refuses before any work."""
    from smaf import pipeline
    from smaf.data.voc import read_id_list
    from smaf.stages import a2gnn, crf, par, random_walk, train_aff

    cfg = tiny_cfg(tiny_voc, tmp_path, "pipeline.subset=3")
    full = {s: read_id_list(cfg.data[k]) for s, k in (("train", "infer_list"), ("val", "val_list"))}
    assert len(full["train"]) > 3
    seen = []

    def fake_path(path_cfg, clock, *args, **kwargs):
        seen.append(path_cfg)
        return {"miou": {"train": {pipeline.FUSED: 1.0}, "val": {pipeline.FUSED: 2.0}}, "folders": {},
                "bg_scores": {}, "warnings": [], "default_column": pipeline.FUSED}

    real_run_path = pipeline.run_path
    monkeypatch.setattr(pipeline, "run_path", fake_path)
    monkeypatch.setattr(pipeline, "make_figure", lambda *a, **k: tmp_path / "figure.jpg")
    summary = pipeline.run_pipeline(cfg, log=lambda _: None)
    sub = summary["subset"]
    n = len(full["train"])
    for split in ("train", "val"):   # 12 and 6 ids: indices 0, 6, 11 and 0, 2, 5 (linspace, rounded half to even)
        ids, m = full[split], len(full[split])
        assert read_id_list(sub[split]) == [ids[0], ids[round((m - 1) / 2)], ids[-1]]
    assert sub["kept"]["train"] == 3 and sub["of"]["train"] == n
    assert seen[0].data.infer_list == sub["train"] and seen[0].data.val_list == sub["val"]
    assert seen[0].data.train_list == cfg.data.train_list             # training still sees every image
    assert pipeline.format_summary(summary).startswith(f"**On a subset**: every mIoU below is of 3 of the {n} train")
    with pytest.raises(ValueError, match="segmentation"):
        pipeline.run_pipeline(cfg, log=lambda _: None, segmentation=True)

    # the refiners make the scored ids only (without a subset: every map of the source folder, as before)
    calls = []
    monkeypatch.setattr(train_aff, "run", lambda c: tmp_path / "aff" / "final.pth")
    for module, key in ((par, "par"), (random_walk, "random_walk"), (a2gnn, "a2gnn")):
        monkeypatch.setattr(module, "run", lambda c, key=key: calls.append((key, c[key].list, c[key].eval_list))
                            or {"miou": 1.0, "out_dir": tmp_path / c[key].out_subdir})
    monkeypatch.setattr(crf, "run", lambda c: {"miou": 1.0})
    default = "self-trained (denoise off)"
    out = {"miou": {"train": {}, "val": {}}, "default_column": default,
           "folders": {s: {pipeline.FUSED: tmp_path / f"fused_{s}", default: tmp_path / f"st_{s}"}
                       for s in ("train", "val")}}
    lists = {"train": ("all.txt", "scored_train.txt"), "val": ("scored_val.txt", "scored_val.txt")}
    pipeline.refine_rows(seen[0], pipeline._Clock(tmp_path / "t.json", lambda _: None), out, lists,
                         ["par", "rw", "a2gnn"])
    assert calls and all(lst == ev for _, lst, ev in calls)
    assert {ev for _, _, ev in calls} == {"scored_train.txt", "scored_val.txt"}
    calls.clear()
    pipeline.refine_rows(tiny_cfg(tiny_voc, tmp_path), pipeline._Clock(tmp_path / "t2.json", lambda _: None), out,
                         lists, ["par", "rw"])
    assert {lst for _, lst, _ in calls} == {""}

    # stage 3 makes the scored ids only too (no stage 4 to feed); stage 1 of the train list stays whole (stage 2)
    from smaf.stages import gen_fusion, gen_pm, train_cls, train_fusion

    made = []
    monkeypatch.setattr(train_cls, "run", lambda c: tmp_path / "cls.pth")
    monkeypatch.setattr(train_fusion, "run", lambda c: tmp_path / "tf" / "final.pth")
    monkeypatch.setattr(gen_fusion, "run", lambda c: made.append(("fusion", c.fusion.list))
                        or {"miou": 1.0, "out_dir": tmp_path / c.fusion.out_subdir,
                            "single": {"miou": 1.0, "out_dir": tmp_path / c.fusion.single_subdir}})
    monkeypatch.setattr(gen_pm, "run", lambda c: made.append(("pm", c.pseudo_masks.list))
                        or {"miou": 1.0, "miou_crf": 1.0, "out_dir": tmp_path / c.pseudo_masks.out_subdir})
    monkeypatch.setattr(pipeline, "fixed_score_comparison", lambda *a, **k: {})
    real_run_path(seen[0], pipeline._Clock(tmp_path / "t3.json", lambda _: None))
    assert made == [("fusion", cfg.data.train_list), ("fusion", sub["val"]),   # each with its single-scale CAM
                    ("pm", sub["train"]), ("pm", sub["val"])]
