"""Stages 2 and 3 and the CRF step over 2 CPU ranks (gloo, launched like torchrun with the machinery of
tests/test_distributed.py), against the same stages in one process. One launch runs every job in order:

* stage 2 with denoising (so its prototype bank moves) ends with the single-process student, EMA teacher and
  prototypes: the class means are all-reduced over the ranks before the bank's update;
* a 2-rank stage 2 resumed from its iteration-2 checkpoint ends with the uninterrupted run's weights;
* stage 3 (with its CRF) and the CRF step shard their lists: every image written exactly once, by one rank,
  with the single-process masks;
* a global batch the ranks cannot split evenly fails on every rank with the sampler's message;
* a non-finite loss on ONE rank stops EVERY rank at that iteration (the flag is all-reduced).

The sampler's contiguous split of a global batch and its divisibility error are also checked directly.
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist

from smaf.checkpoint import read_checkpoint, save_checkpoint
from smaf.config import Config, load_config
from smaf.data.sampler import IterationBatchSampler
from smaf.io import load_cam_dict, load_label_png
from test_distributed import WORLD, run_ranks

TIMEOUT_S = 120   # a normal launch takes ~15 s on 2 loaded cores; a rank stuck at a barrier fails here

pytestmark = pytest.mark.skipif(not (torch_dist.is_available() and torch_dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this build")

# One rank of the group (or the only process): runs the jobs of argv[1] in order and records, per job, the
# images it wrote (stage 3's maps and masks, the CRF's masks) and the one-line error it stopped with, if any.
RANK_SCRIPT = textwrap.dedent("""
    import json, os, shutil, sys
    import torch
    from smaf.config import load_config
    from smaf.cam import writer
    from smaf.refine import pool
    from smaf.stages import crf, gen_pm, train_fusion
    jobs, record = json.loads(open(sys.argv[1]).read()), sys.argv[2]
    rank = int(os.environ.get("RANK", 0))
    events = {}
    write, save_png, make_step = writer._write_outputs, pool.save_label_png, train_fusion.make_step

    def record_write(out_dir, image_id, *args):
        current.append(["maps", image_id])
        return write(out_dir, image_id, *args)

    def record_png(path, label):
        current.append(["crf", os.path.basename(os.path.dirname(str(path))), os.path.basename(str(path))[:-4]])
        return save_png(path, label)

    def nan_on_rank1(*args, **kwargs):   # rank 1's loss of iteration 2 (t = 1) is NaN, rank 0's is finite
        step, after = make_step(*args, **kwargs)
        def bad_step(model, batch, t):
            loss, logs = step(model, batch, t)
            return (loss * float("nan") if rank == 1 and t == 1 else loss), logs
        return bad_step, after

    writer._write_outputs, pool.save_label_png = record_write, record_png
    for job in jobs:
        current = events.setdefault(job["name"], [])
        if job.get("copy"):
            if rank == 0:
                os.makedirs(os.path.dirname(job["copy"][1]), exist_ok=True)
                shutil.copy(*job["copy"])
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
        train_fusion.make_step = nan_on_rank1 if job.get("nan") else make_step
        try:
            {"train_fusion": train_fusion, "gen_pm": gen_pm, "crf": crf}[job["stage"]].run(
                load_config("demo", job["overrides"]))
        except Exception as err:
            current.append(["error", type(err).__name__, " ".join(str(err).split())])
        current.append(["world", torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1])
        with open(f"{record}/rank{rank}.json", "w") as fh:   # after every job: a hang still leaves the record
            json.dump(events, fh)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
""")


def stage_overrides(root: Path, work: Path, *extra: str) -> list:
    """EfficientNet-Lite0 (stride 16; the stage-0 checkpoint is made by :func:`ddp`), single-scale inference, 64-pixel stage-2 crops in global
    batches of 4 (2 per rank), 4 iterations with a checkpoint at 2, denoising with a fast-moving prototype bank
    and EMA (momenta 0.5, so a wrong update cannot hide), one CRF worker."""
    lst = f"{root}/ImageSets/Segmentation"
    return [f"work_dir={work}", f"data.root={root}", f"data.train_list={lst}/train.txt",
            f"data.infer_list={lst}/train.txt", f"data.val_list={lst}/val.txt", "num_workers=0", "device=cpu",
            "model.pretrained=", "inference.scales=[1.0]", "inference.flip=false", "fusion.overlays=0",
            "fusion.prototype_min_pixels=1", "train_fusion.crop=64", "train_fusion.resize_long=[48,96]",
            "train_fusion.batch_size=4", "train_fusion.iterations=4", "train_fusion.ckpt_every=2",
            "train_fusion.val_every=0", "train_fusion.log_every=1", "train_fusion.denoise=true",
            "train_fusion.denoise_rule=softmax", "train_fusion.denoise_temperature=0.5",
            "train_fusion.proto_momentum=0.5", "train_fusion.ema=0.5", "pseudo_masks.overlays=0",
            "crf.overlays=0", "crf.workers=1", *extra]


def launch(jobs: list, record: Path, world: int = WORLD) -> list:
    """Run ``jobs`` in ``world`` processes (torchrun-style environment); returns each rank's events."""
    record.mkdir(parents=True, exist_ok=True)
    (record / "rank_main.py").write_text(RANK_SCRIPT)
    (record / "jobs.json").write_text(json.dumps(jobs))
    return run_ranks([str(record / "rank_main.py"), str(record / "jobs.json"), str(record)], record, world,
                     TIMEOUT_S)


@pytest.fixture(scope="module")
def ddp(tiny_voc, tmp_path_factory):
    """Stage 1, 2 and 3 once in this process (one intra-op thread, as the ranks) and the jobs over 2 ranks.
    Returns (single work dir, folder of the 2-rank runs, each rank's events by job, train ids)."""
    from smaf.models import build_model
    from smaf.stages import gen_fusion, gen_pm, train_fusion

    single, multi = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("ddp")
    cfg = load_config("demo", stage_overrides(tiny_voc, single))
    torch.manual_seed(0)
    # a stage-0 model whose features are not ~1e-9 (random init with frozen BatchNorm): the ImageNet backbone
    model = build_model(Config(dict(cfg.model, head="smaf", pretrained="imagenet")), 5)
    ckpt = save_checkpoint(single / "stage0.pth", model, iteration=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        common = [f"fusion.checkpoint={ckpt}", f"train_fusion.checkpoint={ckpt}"]
        cfg = load_config("demo", stage_overrides(tiny_voc, single, *common))
        gen_fusion.run(cfg)
        train_fusion.run(cfg)
        gen_pm.run(cfg)
    finally:
        torch.set_num_threads(threads)
    stage2 = [f"train_fusion.checkpoint={ckpt}", f"train_fusion.fusion_dir={single}/fusion"]
    jobs = [
        {"name": "train", "stage": "train_fusion", "overrides": stage_overrides(tiny_voc, multi / "a", *stage2)},
        {"name": "resume", "stage": "train_fusion", "overrides": stage_overrides(tiny_voc, multi / "b", *stage2),
         "copy": [str(multi / "a/train_fusion/checkpoints/iter_0000002.pth"),
                  str(multi / "b/train_fusion/checkpoints/iter_0000002.pth")]},
        {"name": "gen_pm", "stage": "gen_pm", "overrides": stage_overrides(
            tiny_voc, multi / "a", f"pseudo_masks.checkpoint={single}/train_fusion/final.pth")},
        {"name": "crf", "stage": "crf", "overrides": stage_overrides(
            tiny_voc, multi / "a", f"crf.input_dir={single}/pseudo_masks/cam_png",
            f"crf.output_dir={multi}/a/crf_step/masks", "crf.out_subdir=crf_step")},
        {"name": "odd_batch", "stage": "train_fusion",
         "overrides": stage_overrides(tiny_voc, multi / "odd", *stage2, "train_fusion.batch_size=3")},
        {"name": "nan", "stage": "train_fusion", "nan": True, "overrides": stage_overrides(
            tiny_voc, multi / "nan", *stage2, "train_fusion.iterations=3", "train_fusion.ckpt_every=1")},
    ]
    events = launch(jobs, multi / "record")
    ids = (tiny_voc / "ImageSets/Segmentation/train.txt").read_text().split()
    return single, multi, events, ids


def _errors(events, job):
    return [[e[1:] for e in ev[job] if e[0] == "error"] for ev in events]


def _assert_close_states(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys(), what
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} {key}: {m}")


@pytest.mark.cost(40)
def test_ddp_stage2_ends_with_the_single_process_student_teacher_and_prototypes(ddp):
    """Each rank trains on its half of every global batch; DDP averages the gradients, every rank's EMA
    teacher follows the same student and the bank moves with the class means summed over the ranks: rank 0's
    files equal one process's on the whole batches."""
    single, multi, events, _ = ddp
    assert all(ev["train"] == [["world", WORLD]] for ev in events), events[0]["train"]
    s_dir, m_dir = single / "train_fusion", multi / "a" / "train_fusion"
    for name in ("final.pth", "final_teacher.pth"):
        _assert_close_states(read_checkpoint(m_dir / name)["model"], read_checkpoint(s_dir / name)["model"], name)
    s_ck, m_ck = (read_checkpoint(d / "checkpoints" / "iter_0000002.pth") for d in (s_dir, m_dir))
    _assert_close_states(m_ck["extras"]["teacher"], s_ck["extras"]["teacher"], "iteration-2 teacher")
    start = torch.load(single / "fusion" / "prototypes.pt")["prototypes"]
    moved = s_ck["extras"]["prototypes"]["prototypes"]
    assert (moved - start).abs().amax(1).gt(1e-3).sum() >= 2, "the bank barely moved: the check would be vacuous"
    torch.testing.assert_close(m_ck["extras"]["prototypes"]["prototypes"], moved, rtol=1e-5, atol=1e-6)
    assert len(m_ck["rng"]) == WORLD and "world size 2" in (m_dir / "log.txt").read_text()


def test_ddp_stage2_resumed_from_its_checkpoint_ends_with_the_uninterrupted_weights(ddp):
    """Killed after the iteration-2 checkpoint (only it survives): 2 ranks resume model, optimiser, teacher and
    prototype bank and see the batches of iterations 3-4, ending where the uninterrupted 2-rank run ended."""
    _, multi, events, _ = ddp
    assert all(ev["resume"] == [["world", WORLD]] for ev in events), events[0]["resume"]
    a, b = multi / "a" / "train_fusion", multi / "b" / "train_fusion"
    assert "resumed from" in (b / "log.txt").read_text()
    for name in ("final.pth", "final_teacher.pth"):
        _assert_close_states(read_checkpoint(b / name)["model"], read_checkpoint(a / name)["model"], name)
    steps = [json.loads(line)["iteration"] for line in (b / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 4]   # from the checkpoint on, each iteration logged once (by rank 0)


def test_sharded_stage3_and_crf_step_write_every_image_once_with_single_process_masks(ddp):
    """Stage 3's maps and masks, its CRF masks and the CRF step's masks: each image by exactly one rank
    (round robin, 6 each), and the same files as one process writes."""
    single, multi, events, ids = ddp
    assert all(ev["gen_pm"][-1] == ["world", WORLD] and ev["crf"][-1] == ["world", WORLD] for ev in events)
    writes = {"maps": [[e[1] for e in ev["gen_pm"] if e[0] == "maps"] for ev in events],
              "crf_png": [[e[2] for e in ev["gen_pm"] if e[:2] == ["crf", "crf_png"]] for ev in events],
              "step": [[e[2] for e in ev["crf"] if e[:2] == ["crf", "masks"]] for ev in events]}
    for what, per_rank in writes.items():
        assert all(len(w) == len(set(w)) == len(ids) // WORLD for w in per_rank), (what, per_rank)
        assert not set(per_rank[0]) & set(per_rank[1]), f"{what}: two ranks wrote the same image"
        assert sorted(per_rank[0] + per_rank[1]) == sorted(ids), what
    s_pm, m_pm = single / "pseudo_masks", multi / "a" / "pseudo_masks"
    for image_id in ids:
        sa, ma = (load_cam_dict(d / "cam_npy" / f"{image_id}.npy") for d in (s_pm, m_pm))
        assert sorted(sa) == sorted(ma), image_id
        for c in sa:
            np.testing.assert_allclose(ma[c], sa[c], atol=1e-6, err_msg=f"{image_id} class {c}")
        plain, refined = (load_label_png(s_pm / sub / f"{image_id}.png") for sub in ("cam_png", "crf_png"))
        for got, expected in ((m_pm / "cam_png", plain), (m_pm / "crf_png", refined),
                              (multi / "a" / "crf_step" / "masks", refined)):
            np.testing.assert_array_equal(load_label_png(got / f"{image_id}.png"), expected, err_msg=str(got))
    assert (m_pm / "eval" / "crf_png.json").is_file()   # rank 0 scored the CRF masks once all were written


def test_a_global_batch_the_ranks_cannot_split_fails_on_every_rank(ddp):
    _, multi, events, _ = ddp
    message = ("train_fusion.batch_size=3: the global batch must be divisible by the 2 processes; set "
               "train_fusion.batch_size to a multiple of 2")
    assert _errors(events, "odd_batch") == [[["ConfigError", message]]] * WORLD
    assert not (multi / "odd" / "train_fusion").exists()   # checked before the stage writes anything


def test_a_non_finite_loss_on_one_rank_stops_every_rank_at_that_iteration(ddp):
    """Rank 1's loss of iteration 2 is NaN, rank 0's is finite: both stop there with the one-line error (rank
    0 too: its flag is the all-reduced one), before the optimiser step, so no iteration-2 checkpoint."""
    _, multi, events, _ = ddp
    errors = _errors(events, "nan")
    assert all(len(e) == 1 and e[0][0] == "StageError" for e in errors), errors
    assert all(e[0][1].startswith("non-finite loss at iteration 2 (images ") for e in errors), errors
    out = multi / "nan" / "train_fusion"
    assert [p.name for p in sorted((out / "checkpoints").glob("*.pth"))] == ["iter_0000001.pth"]
    assert not (out / "final.pth").exists()


def test_sampler_splits_each_global_batch_into_equal_contiguous_parts():
    """Rank r of w gets positions r*B/w .. (r+1)*B/w - 1 of every global batch (index and seed), whatever the
    start; a batch size the ranks cannot split is a ValueError naming both numbers."""
    whole = list(IterationBatchSampler(7, 6, seed=3, start_iter=0, total_iters=4))
    assert len(whole) == 4 and all(len(b) == 6 for b in whole)
    # epochs are permutations of the 7 items: positions 0..6 and 7..13 each hold every index once
    flat = [i for b in whole for i, _ in b]
    assert sorted(flat[:7]) == list(range(7)) and sorted(flat[7:14]) == list(range(7))
    for world in (2, 3):
        parts = [list(IterationBatchSampler(7, 6, 3, 1, 4, rank=r, world=world)) for r in range(world)]
        for t in range(1, 4):
            k = 6 // world
            assert [parts[r][t - 1] for r in range(world)] == [whole[t][r * k:(r + 1) * k] for r in range(world)]
    with pytest.raises(ValueError, match="^batch size 6 is not divisible by the number of processes 4$"):
        IterationBatchSampler(7, 6, 3, 0, 4, rank=0, world=4)
