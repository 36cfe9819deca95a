"""Training checkpoints of the engine (smaf/engine.py) and reading them (smaf/checkpoint.py): ``resume=none``
trains from iteration 0 although checkpoints exist, ``resume=<path>`` resumes from exactly that file, pruning
keeps the two newest checkpoints of the run, and ``read_checkpoint`` turns every corrupt, truncated or foreign
file into one line naming it, without unpickling anything but tensors and plain containers.

The runs are the engine's own loop on a 1x1-convolution classifier over 4 images of the tiny synthetic set at
32 px (a run of a few iterations takes well under a second)."""
from __future__ import annotations

import logging
import os
import pathlib
import shutil

import pytest
import torch

from smaf.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from smaf.config import load_config
from smaf.models.registry import build_from_spec, register_architecture
from smaf.runtime import expected_errors

ARCH = "test_resume_pixel_classifier"


@register_architecture(ARCH)
def _pixel_classifier(classes: int):
    net = torch.nn.Conv2d(3, classes, 1)
    net.param_groups = lambda: [[], [], [net.weight], [net.bias]]
    return net


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def dataset(tiny_voc):
    from smaf.data.transforms import JointTrainTransform
    from smaf.data.voc import ClassificationDataset, VOCLayout

    layout = VOCLayout(tiny_voc)
    ids = layout.read_list(tiny_voc / "ImageSets/Segmentation/train.txt")[:4]
    return ClassificationDataset(layout, ids, JointTrainTransform(32, (32, 48)))


def train(dataset, out, iterations, resume="auto", ckpt_every=1):
    """One train_loop run into ``out``; returns (final path, the iterations its steps ran, the weights the model
    had before its first step, the log lines)."""
    from smaf.engine import train_loop
    from smaf.optim import build_optimizer

    cfg = load_config("demo", ["num_workers=0", f"train_cls.iterations={iterations}",
                               f"train_cls.ckpt_every={ckpt_every}", "train_cls.val_every=0",
                               "train_cls.log_every=1", f"train_cls.resume={resume}"])
    sect = cfg.train_cls
    torch.manual_seed(0)
    model = build_from_spec({"arch": ARCH, "args": {"classes": 5}})
    steps, first = [], {}

    def step(net, batch, it):
        if not steps:
            first.update({k: v.detach().clone() for k, v in net.state_dict().items()})
        steps.append(it)
        logits = net(batch["image"]).mean((2, 3))
        return torch.nn.functional.multilabel_soft_margin_loss(logits, batch["labels"]), {}

    logger = logging.getLogger(f"test_resume.{out.name}")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    out.mkdir(parents=True, exist_ok=True)
    try:
        final = train_loop(cfg, sect, out, logger, torch.device("cpu"), model, dataset, step,
                           lambda total: build_optimizer(sect, model.param_groups(), total))
    finally:
        logger.removeHandler(handler)
    return final, steps, first, records


def checkpoint_names(out) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def metrics_iterations(out) -> list[int]:
    import json

    return [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- resume
def test_resume_none_trains_from_the_start_although_checkpoints_exist(dataset, tmp_path):
    out = tmp_path / "run"
    _, steps, _, _ = train(dataset, out, 4)
    assert steps == [0, 1, 2, 3] and checkpoint_names(out) == ["iter_0000002.pth", "iter_0000003.pth"]
    (out / "final.pth").unlink()     # so that resume=auto would resume from iter_0000003.pth

    _, steps, first, log = train(dataset, out, 4, resume="none")
    assert steps == [0, 1, 2, 3]
    assert not any("resumed from" in line for line in log)
    torch.manual_seed(0)
    fresh = build_from_spec({"arch": ARCH, "args": {"classes": 5}}).state_dict()
    assert all(torch.equal(first[k], fresh[k]) for k in fresh)          # the initial weights, not a checkpoint's
    assert metrics_iterations(out) == [1, 2, 3, 4]                      # the first run's rows are not kept


def test_resume_path_resumes_from_exactly_that_file(dataset, tmp_path):
    out = tmp_path / "run"
    reference_final, _, _, _ = train(dataset, out, 4)
    reference = read_checkpoint(reference_final)["model"]
    chosen = shutil.copy(out / "checkpoints" / "iter_0000002.pth", tmp_path / "chosen.pth")
    saved = read_checkpoint(chosen)["model"]

    # iter_0000003.pth is newer and final.pth exists: an explicit path still resumes from the file it names
    final, steps, first, log = train(dataset, out, 4, resume=str(chosen))
    assert steps == [2, 3]
    assert f"resumed from {chosen} at iteration 2" in log
    assert all(torch.equal(first[k], saved[k]) for k in saved)
    trained = read_checkpoint(final)["model"]
    assert all(torch.equal(trained[k], reference[k]) for k in reference)   # exact resume: same final weights
    assert metrics_iterations(out) == [1, 2, 3, 4]

    (out / "final.pth").unlink()
    _, steps, _, log = train(dataset, out, 4, resume="auto")               # for contrast: auto takes the newest
    assert steps == [3] and any("iter_0000003.pth at iteration 3" in line for line in log)


def test_resume_path_of_a_missing_file_is_one_line(dataset, tmp_path):
    missing = tmp_path / "nowhere" / "iter_0000002.pth"
    with pytest.raises(CheckpointError) as info:
        train(dataset, tmp_path / "run", 4, resume=str(missing))
    assert f"checkpoint '{missing}' not found" in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- pruning
def test_pruning_keeps_the_two_newest_checkpoints_and_nothing_else_is_touched(dataset, tmp_path):
    out = tmp_path / "every1"
    (out / "checkpoints").mkdir(parents=True)
    for other in ("notes.txt", "iter_3.pth.bak"):
        (out / "checkpoints" / other).write_text("keep me")
    train(dataset, out, 6)                                   # checkpoints at 1..5 (none at the last iteration)
    assert checkpoint_names(out) == ["iter_0000004.pth", "iter_0000005.pth", "iter_3.pth.bak", "notes.txt"]
    assert read_checkpoint(out / "checkpoints" / "iter_0000005.pth")["iteration"] == 5

    out = tmp_path / "every2"
    train(dataset, out, 7, ckpt_every=2)                     # checkpoints at 2, 4, 6
    assert checkpoint_names(out) == ["iter_0000004.pth", "iter_0000006.pth"]


def test_a_fresh_run_replaces_the_checkpoints_of_a_longer_earlier_run(dataset, tmp_path):
    """resume=none in a folder holding iter_0000008/9.pth of an earlier, longer run: the new run's checkpoints
    used to be pruned as soon as they were written (the old ones sort after them), so an interruption later
    resumed (resume=auto) from the old run's iteration 9. The old, newer-numbered files are removed instead."""
    out = tmp_path / "run"
    train(dataset, out, 3)
    old = out / "checkpoints" / "iter_0000002.pth"
    for n in (8, 9):
        shutil.copy(old, out / "checkpoints" / f"iter_{n:07d}.pth")
    (out / "final.pth").unlink()
    train(dataset, out, 3, resume="none")
    assert checkpoint_names(out) == ["iter_0000001.pth", "iter_0000002.pth"]
    (out / "final.pth").unlink()
    _, steps, _, _ = train(dataset, out, 3)                  # as after a kill: resumes from this run's newest
    assert steps == [2]


# ------------------------------------------------------------------------------------ read_checkpoint
class TouchOnLoad:
    """Unpickling an instance touches a marker file (so a loader that runs code from the file is seen)."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _valid(path):
    net = torch.nn.Conv2d(3, 2, 1)
    return save_checkpoint(path, net, meta={"arch": ARCH, "args": {"classes": 2}}, iteration=1)


def _truncated(path):
    data = _valid(path).read_bytes()
    path.write_bytes(data[:len(data) // 2])


BAD_FILES = {
    "empty": (lambda p: p.write_bytes(b""), "is unreadable"),
    "random": (lambda p: p.write_bytes(os.urandom(3000)), "is unreadable"),
    "text": (lambda p: p.write_text("model: none\n"), "is unreadable"),
    "truncated": (_truncated, "is unreadable"),
    "plain_state_dict": (lambda p: torch.save({"weight": torch.zeros(2)}, p), "is not a smaf checkpoint"),
    "list": (lambda p: torch.save([1, 2, 3], p), "is not a smaf checkpoint"),
    "no_tensors": (lambda p: torch.save({"format": "smaf", "meta": {"arch": ARCH}, "model": {}}, p),
                   "has no 'model' state dict of tensors"),
    "meta_without_arch": (lambda p: torch.save({"format": "smaf", "meta": {"head": "smaf"},
                                                "model": {"w": torch.zeros(1)}}, p), "lacks the architecture"),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_bad_checkpoint_files_are_one_line_naming_the_file(tmp_path, capsys, kind):
    write, expected = BAD_FILES[kind]
    path = tmp_path / "iter_0000004.pth"
    write(path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path, producer="stage 0")
    text = str(info.value)
    assert expected in text and str(path) in text and "\n" not in text, text
    if expected == "is unreadable":
        assert "re-run stage 0" in text
    with pytest.raises(SystemExit) as exit_info, expected_errors():       # at the command line: no traceback
        read_checkpoint(path, producer="stage 0")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err == f"error: {text}\n"


def test_a_checkpoint_with_code_is_refused_and_nothing_of_it_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "final.pth"
    torch.save({"format": "smaf", "meta": {"arch": ARCH, "args": {}}, "model": {"w": torch.zeros(1)},
                "extra": TouchOnLoad(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    text = str(info.value)
    assert text.startswith(f"refused to load checkpoint '{path}': unpickling it needs '") and "\n" not in text
    assert "could run code" in text and "--trust-pickle" in text
    assert not marker.exists()


def test_a_valid_checkpoint_reads_back(tmp_path):
    """The contrast case of the bad files above (same writer as the truncated one)."""
    ckpt = read_checkpoint(_valid(tmp_path / "ok.pth"))
    assert ckpt["iteration"] == 1 and ckpt["meta"] == {"arch": ARCH, "args": {"classes": 2}}
    assert sorted(ckpt["model"]) == ["bias", "weight"]
