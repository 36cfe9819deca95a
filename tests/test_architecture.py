"""The task-neutral core: stages are leaves, the model registry and checkpoint formats (old ones included), the
run layout, config fragments and moved keys, the optimiser choice, the soft-score CRF and the one exit code."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smaf.checkpoint import architecture_spec, load_model, read_checkpoint, save_checkpoint
from smaf.config import ConfigError, derive, load_config
from smaf.models import build_model
from smaf.models.registry import architectures, build_from_spec, register_architecture
from smaf.run_layout import RunLayout

PACKAGE = Path(__file__).resolve().parents[1] / "smaf"


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of the smaf modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if path.name == "__init__.py":
        package += ".__init__"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("smaf"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:-node.level]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("smaf"):
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_stages_are_leaves_and_the_core_never_imports_a_stage():
    stage_files = [p for p in (PACKAGE / "stages").glob("*.py") if p.name != "__init__.py"]
    stage_modules = {f"smaf.stages.{p.stem}" for p in stage_files}
    assert {"smaf.stages.train_cls", "smaf.stages.gen_fusion", "smaf.stages.train_fusion", "smaf.stages.gen_pm",
            "smaf.stages.crf"} <= stage_modules
    for path in stage_files:
        others = (stage_modules - {f"smaf.stages.{path.stem}"}) & _imported_modules(path)
        assert not others, f"{path.name} imports the stage(s) {others}"
    # the runners (pipeline, speed benchmark) chain stages; nothing else may
    runners = {PACKAGE / "pipeline.py"} | set((PACKAGE / "bench").glob("*.py"))
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE / "stages" or path in runners:
            continue
        bad = {m for m in _imported_modules(path) if m.startswith("smaf.stages")}
        assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_the_library_core_does_not_import_the_benchmark():
    for path in PACKAGE.rglob("*.py"):
        if path.parent == PACKAGE / "bench":
            continue
        assert not {m for m in _imported_modules(path) if m.startswith("smaf.bench")}, path


# --------------------------------------------------------------------------------------------- registry
def _cam_net_spec(**args):
    base = {"num_classes": 3, "backbone": "efficientnet_lite0", "output_stride": 16, "feat_dim": 16, "head": "smaf"}
    return {"arch": "cam_net", "args": {**base, **args}}


def test_build_model_records_its_architecture_and_a_checkpoint_rebuilds_it(tmp_path):
    cfg = load_config("demo").model
    torch.manual_seed(0)
    model = build_model(dict(cfg, pretrained="", feat_dim=16, head="cls"), 3).eval()
    assert model.arch_spec == _cam_net_spec(head="cls")
    model.add_background_channel()        # the stage-2 conversion is recorded too
    assert model.arch_spec["args"]["head"] == "smaf"
    save_checkpoint(tmp_path / "m.pth", model, iteration=1)
    rebuilt, spec = load_model(tmp_path / "m.pth")
    assert spec == model.arch_spec and rebuilt.num_outputs == 4
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x)[1], model(x)[1], rtol=0, atol=0)


def test_checkpoints_of_the_previous_layout_still_load(tmp_path):
    """Checkpoints of earlier smaf versions hold the CAM network's fields directly in ``meta``."""
    torch.manual_seed(1)
    model = build_from_spec(_cam_net_spec()).eval()
    legacy_meta = {"backbone": "efficientnet_lite0", "head": "smaf", "num_classes": 3, "output_stride": 16,
                   "feat_dim": 16}
    torch.save({"format": "smaf", "model": model.state_dict(), "meta": legacy_meta, "iteration": 5},
               tmp_path / "old.pth")
    rebuilt, spec = load_model(tmp_path / "old.pth")
    assert spec == _cam_net_spec() == architecture_spec(legacy_meta)
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x)[1], model(x)[1])


def test_any_registered_architecture_round_trips_through_a_checkpoint(tmp_path):
    @register_architecture("test_tiny_linear")
    def tiny(width: int, out: int = 2):
        return torch.nn.Linear(width, out)

    assert "test_tiny_linear" in architectures()
    net = build_from_spec({"arch": "test_tiny_linear", "args": {"width": 5}})
    save_checkpoint(tmp_path / "t.pth", net)
    rebuilt, spec = load_model(tmp_path / "t.pth")
    assert spec == {"arch": "test_tiny_linear", "args": {"width": 5}} and rebuilt.weight.shape == (2, 5)
    assert torch.equal(rebuilt.weight, net.weight)
    with pytest.raises(ValueError, match="unknown architecture 'nope'.*cam_net"):
        build_from_spec({"arch": "nope", "args": {}})
    with pytest.raises(ValueError, match="no arch_spec"):
        save_checkpoint(tmp_path / "x.pth", torch.nn.Linear(2, 2))
    assert read_checkpoint(tmp_path / "t.pth")["meta"]["arch"] == "test_tiny_linear"


# ------------------------------------------------------------------------------------------- run layout
def test_run_layout_names_stage_folders_and_default_inputs(tmp_path):
    cfg = load_config("demo", [f"work_dir={tmp_path}", "train_cls.out_subdir=cls_a", "fusion.out_subdir=fus_b",
                               "train_fusion.out_subdir=st_c", "pseudo_masks.out_subdir=pm_d"])
    runs = RunLayout(cfg)
    assert runs.stage_dir("train_cls") == tmp_path / "cls_a"
    assert runs.input("fusion", "checkpoint") == tmp_path / "cls_a" / "final.pth"
    assert runs.input("train_fusion", "checkpoint") == tmp_path / "cls_a" / "final.pth"
    assert runs.input("train_fusion", "fusion_dir") == tmp_path / "fus_b"
    assert runs.input("pseudo_masks", "checkpoint") == tmp_path / "st_c" / "final.pth"
    assert runs.input("crf", "input_dir") == tmp_path / "pm_d" / "cam_png"
    assert runs.stage_dir("crf") == tmp_path / "pm_d"          # beside the masks it refines
    assert "gen_fusion.sh" in runs.producer("train_fusion", "fusion_dir")
    explicit = RunLayout(derive(cfg, fusion__checkpoint="/x/y.pth", crf__input_dir="/m/png", crf__out_subdir="c"))
    assert explicit.input("fusion", "checkpoint") == Path("/x/y.pth")
    assert explicit.stage_dir("crf") == tmp_path / "c" and explicit.input("crf", "input_dir") == Path("/m/png")


# -------------------------------------------------------------------------------------- config fragments
def test_a_method_brings_its_config_fragment_and_only_the_selected_one_stays():
    eps = load_config("voc12").train_cls
    assert eps.method == "eps" and eps.eps == {"tau": 0.4, "lam": 0.5} and "cam" not in eps
    assert eps.optimizer == "poly_sgd" and eps.poly_sgd == {"momentum": 0.0, "power": 0.9} and "adamw" not in eps
    cam = load_config("pets").train_cls
    assert cam.method == "cam" and "eps" not in cam
    tuned = load_config("voc12", ["train_cls.eps.tau=0.3", "train_cls.optimizer=adamw",
                                  "train_cls.adamw.warmup_iters=7"]).train_cls
    assert tuned.eps.tau == 0.3 and tuned.adamw.warmup_iters == 7 and "poly_sgd" not in tuned
    with pytest.raises(ConfigError, match=r"train_cls\.method='nope'.*cam, eps"):
        load_config("voc12", ["train_cls.method=nope"])
    with pytest.raises(ConfigError, match="unknown config key 'train_cls.eps.taux'"):
        load_config("voc12", ["train_cls.eps.taux=1"])
    switched = derive(load_config("pets"), train_cls__method="eps")
    assert switched.train_cls.eps.lam == 0.5 and "cam" not in switched.train_cls


def test_a_dataset_config_may_set_keys_of_any_fragment(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: pets\ntrain_cls:\n  eps:\n    tau: 0.25\n")
    assert "eps" not in load_config(path).train_cls                     # pets selects cam
    assert load_config(path, ["train_cls.method=eps"]).train_cls.eps.tau == 0.25


def test_moved_keys_still_work_in_overrides_and_files(tmp_path, caplog):
    cfg = load_config("voc12", ["train_cls.loss=cam", "fusion.scales=[1.0]", "train_cls.momentum=0.9",
                                "pseudo_masks.bg_method=otsu"])
    assert cfg.train_cls.method == "cam" and cfg.inference.scales == [1.0]
    assert cfg.train_cls.poly_sgd.momentum == 0.9 and cfg.inference.bg_method == "otsu"
    assert "'train_cls.loss' (override) is now 'train_cls.method'" in caplog.text
    path = tmp_path / "old.yaml"
    path.write_text("base: voc12\ntrain_cls:\n  loss: cam\n  tau: 0.3\nfusion:\n  base_long: 320\n  overlays: 2\n")
    old = load_config(path, ["train_cls.method=eps"])
    assert old.train_cls.eps.tau == 0.3 and old.inference.base_long == 320 and old.fusion.overlays == 2


# ---------------------------------------------------------------------------------------------- optimisers
def _four_groups():
    torch.manual_seed(0)
    return [[torch.nn.Parameter(torch.randn(3, 2))], [torch.nn.Parameter(torch.randn(3))],
            [torch.nn.Parameter(torch.randn(4, 2))], [torch.nn.Parameter(torch.randn(4))]]


def test_adamw_warms_up_linearly_then_decays_and_resumes_exactly():
    from smaf.optim import WarmupPolyAdamW, build_optimizer

    sect = load_config("voc12", ["train_cls.optimizer=adamw", "train_cls.lr=0.001", "train_cls.adamw.warmup_iters=4",
                                 "train_cls.adamw.warmup_ratio=0.1", "train_cls.adamw.power=1.0"]).train_cls
    groups = _four_groups()
    opt = build_optimizer(sect, groups, max_step=10)
    assert isinstance(opt, WarmupPolyAdamW)
    assert [g["lr_mult"] for g in opt.param_groups] == [1.0, 1.0, 10.0, 10.0]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0005, 0.0, 0.0005, 0.0]
    expected = [0.1 + 0.9 * t / 4 for t in range(4)] + [1 - t / 10 for t in range(4, 10)]
    seen = []
    for t in range(10):
        for g in groups:
            for p in g:
                p.grad = torch.ones_like(p)
        seen.append(opt.current_lrs()[0] / 0.001)
        opt.step()
        if t == 5:
            state = opt.state_dict()
    np.testing.assert_allclose(seen, expected, rtol=1e-12)
    again = build_optimizer(sect, _four_groups(), max_step=10)
    again.load_state_dict(state)
    assert again.global_step == 6 and again.current_lrs()[2] == pytest.approx(0.001 * 10 * (1 - 6 / 10))


def test_bad_optimizer_or_length_is_a_config_error():
    from smaf.optim import build_optimizer

    with pytest.raises(ConfigError, match="train_cls.optimizer='sgdx'"):
        load_config("voc12", ["train_cls.optimizer=sgdx"])
    sect = load_config("voc12").train_cls
    with pytest.raises(ConfigError, match=r"train_cls\.iterations=0: must be >= 1"):
        build_optimizer(sect, _four_groups(), 0, "train_cls")


# -------------------------------------------------------------------------------------------- refinement
def test_soft_score_crf_equals_a_direct_pydensecrf_call():
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    from smaf.refine import CRFParams, CRFScoreRefiner, crf_refine_scores

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    cams = {1: rng.random((30, 40)).astype(np.float32), 4: rng.random((30, 40)).astype(np.float32)}
    params = CRFParams(bi_sxy=80, bi_srgb=13)
    maps = np.stack([cams[1], cams[4]])
    probs = np.concatenate([(1 - maps.max(0, keepdims=True)) ** 4, maps])
    crf = dcrf.DenseCRF2D(40, 30, 3)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.ascontiguousarray(image), compat=10)
    direct = np.array(crf.inference(10)).reshape(3, 30, 40)
    ours = crf_refine_scores(image, probs, params)
    np.testing.assert_allclose(ours, direct, atol=1e-6)
    np.testing.assert_allclose(ours.sum(0), 1.0, atol=1e-4)
    label = CRFScoreRefiner(params, alpha=4)(image, cams, [1, 4])
    np.testing.assert_array_equal(label, np.array([0, 2, 5], np.uint8)[direct.argmax(0)])


def test_score_refiner_runs_over_a_folder_of_cam_dicts(tiny_voc, tmp_path):
    from smaf.data.voc import VOCLayout
    from smaf.io import load_label_png, save_cam_dict
    from smaf.refine import CRFScoreRefiner, refine_folder

    layout = VOCLayout(tiny_voc)
    ids = layout.read_list(tiny_voc / "ImageSets/Segmentation/val.txt")[:3]
    for i in ids:   # CAMs = the true masks, softened: the CRF must give back (nearly) the masks
        mask = layout.load_mask(i)
        cams = {c: np.where(mask == c + 1, 0.9, 0.05).astype(np.float32) for c in np.nonzero(layout.labels[i])[0]}
        save_cam_dict(tmp_path / "npy" / f"{i}.npy", cams)
    assert refine_folder(layout, tmp_path / "npy", tmp_path / "out", ids, CRFScoreRefiner(), 2, overlay_ids=ids[:1]) == 3
    for i in ids:
        mask, out = layout.load_mask(i), load_label_png(tmp_path / "out" / f"{i}.png")
        valid = mask != 255
        assert (out[valid] == mask[valid]).mean() > 0.95
    assert (tmp_path / "overlays" / f"{ids[0]}_crf.jpg").is_file()


# ------------------------------------------------------------------------------------ task-neutral loop
def test_training_loop_takes_any_step_validator_and_optimizer(tiny_voc, tmp_path):
    """A non-CAM task: the loop trains with the step, validator and optimiser the caller passes and logs the
    validator's own metrics."""
    import logging

    from smaf.data.transforms import JointTrainTransform
    from smaf.data.voc import ClassificationDataset, VOCLayout
    from smaf.engine import train_loop
    from smaf.optim import build_optimizer

    @register_architecture("test_pixel_classifier")
    def pixel_classifier(classes: int):
        net = torch.nn.Conv2d(3, classes, 1)
        net.param_groups = lambda: [[], [], [net.weight], [net.bias]]
        return net

    cfg = load_config("demo", ["num_workers=0", "train_cls.iterations=3", "train_cls.ckpt_every=2",
                               "train_cls.val_every=2", "train_cls.log_every=1", "train_cls.optimizer=adamw",
                               "train_cls.lr=0.01", "train_cls.adamw.warmup_iters=1"])
    sect = cfg.train_cls
    layout = VOCLayout(tiny_voc)
    ids = layout.read_list(tiny_voc / "ImageSets/Segmentation/train.txt")[:4]
    dataset = ClassificationDataset(layout, ids, JointTrainTransform(32, (32, 48)))
    model = build_from_spec({"arch": "test_pixel_classifier", "args": {"classes": 5}})
    calls = []

    def step(net, batch, it):
        logits = net(batch["image"]).mean((2, 3))
        return torch.nn.functional.multilabel_soft_margin_loss(logits, batch["labels"]), {"extra": 1.0}

    def validator(net):
        calls.append(net.training)
        return {"bias_norm": float(net.bias.detach().norm())}

    out = tmp_path / "task"
    out.mkdir()
    final = train_loop(cfg, sect, out, logging.getLogger("test"), torch.device("cpu"), model, dataset, step,
                       lambda total: build_optimizer(sect, model.param_groups(), total), validator=validator)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "bias_norm" in r] == [2, 3]
    assert all(r["extra"] == 1.0 for r in rows if "loss" in r) and len(calls) == 2
    rebuilt, spec = load_model(final)
    assert spec["arch"] == "test_pixel_classifier" and torch.equal(rebuilt.bias, model.bias)


# ------------------------------------------------------------------------------------------ exit status
def test_every_entry_point_exits_with_the_same_status_for_an_expected_error(tmp_path):
    from smaf.runtime import EXIT_EXPECTED_ERROR

    cmds = [["-m", "smaf.stages.gen_fusion", "--config", "demo", f"data.root={tmp_path}/none"],
            ["-m", "smaf.stages.train_cls", "--config", "demo", "train_cls.nokey=1"],
            ["-m", "smaf.evaluate", "--pred", str(tmp_path / "none"), "--gt", str(tmp_path)],
            ["-m", "smaf.pipeline", "--config", "demo", "train_cls.method=nope"]]
    for cmd in cmds:
        out = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=PACKAGE.parent)
        assert out.returncode == EXIT_EXPECTED_ERROR == 2, (cmd, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert lines[-1].startswith("error:") and "Traceback" not in out.stderr, (cmd, out.stderr)


# ------------------------------------------------------------------------------------------ fidelity
def test_multi_scale_inputs_are_resized_exactly_as_pil_bicubic(tiny_voc):
    from PIL import Image

    from smaf.data.transforms import normalize
    from smaf.data.voc import InferenceDataset, VOCLayout

    layout = VOCLayout(tiny_voc)
    ids = layout.read_list(tiny_voc / "ImageSets/Segmentation/val.txt")[:2]
    scales = load_config("voc12").inference.scales
    for sample in InferenceDataset(layout, ids, scales=scales, resize="pil"):
        image = sample["image"]
        h, w = image.shape[:2]
        for s, x in zip(scales, sample["scaled"]):
            size = (max(1, round(w * s)), max(1, round(h * s)))
            ref = np.asarray(Image.fromarray(image).resize(size, resample=Image.BICUBIC)) if s != 1 else image
            np.testing.assert_array_equal(x.numpy(), normalize(ref))       # tolerance 0: PIL itself
    cv2_sample = InferenceDataset(layout, ids[:1], scales=(0.5,), resize="cv2")[0]
    pil_sample = InferenceDataset(layout, ids[:1], scales=(0.5,), resize="pil")[0]
    assert not torch.equal(cv2_sample["scaled"][0], pil_sample["scaled"][0])   # the two kernels differ


def test_crf_with_all_labels_equals_the_reference_construction():
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    from smaf.refine import CRFLabelRefiner, CRFParams

    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
    label = np.zeros((24, 32), np.uint8)
    label[5:18, 6:20] = 13
    label[rng.random(label.shape) < 0.1] = 4
    # the reference: unary over all 21 labels, gt_prob 0.7, Gaussian 3/3, bilateral 50/5/10, 10 iterations
    crf = dcrf.DenseCRF2D(32, 24, 21)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_labels(label, 21, gt_prob=0.7, zero_unsure=False)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(image), compat=10)
    expected = np.array(crf.inference(10)).reshape(21, 24, 32).argmax(0)
    cfg = load_config("voc12", ["crf.unary_labels=all"]).crf
    ours = CRFLabelRefiner.from_config(cfg, 20)(image, label, [3, 12])
    np.testing.assert_array_equal(ours, expected)
    own_labels = CRFLabelRefiner(CRFParams())(image, label, [3, 12])
    assert set(np.unique(own_labels)) <= {0, 4, 13}
    with pytest.raises(ConfigError, match="crf.unary_labels='some'"):
        CRFLabelRefiner.from_config(load_config("voc12", ["crf.unary_labels=some"]).crf, 20)
