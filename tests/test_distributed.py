"""Multi-process runs on CPU (gloo, 2 processes launched like torchrun: RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT set, so :func:`smaf.dist.init_from_env` joins the group).

* Stage 0 through the real :func:`smaf.engine.train_loop` under DDP ends with the weights of one process
  training on the same global batches (each rank gets an equal contiguous half of every global batch).
* Stage 1 sharded over 2 ranks writes every image exactly once (each rank records the ids it wrote), with the
  outputs of a single-process run, and rank 0 alone writes ``prototypes.pt``, equal to the single-process one.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist

from smaf.checkpoint import read_checkpoint
from smaf.config import load_config
from smaf.io import load_cam_dict, load_label_png

REPO_ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(not (torch_dist.is_available() and torch_dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this build")

# Runs one stage in one process; under WORLD_SIZE > 1 it is one rank of the group. For stage 1 it records
# the ids this rank wrote and the files it saved with torch.save (wrapping the module's own functions).
RANK_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    from smaf.config import load_config
    stage, overrides, record = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    cfg = load_config("demo", overrides)
    rank = int(os.environ.get("RANK", 0))
    events = []
    try:
        if stage == "train_cls":
            from smaf.stages import train_cls
            train_cls.run(cfg)
        else:
            from smaf.cam import writer
            from smaf.stages import gen_fusion
            write, save = writer._write_outputs, torch.save
            def recording_write(out_dir, image_id, *args):
                events.append(["write", image_id])
                return write(out_dir, image_id, *args)
            def recording_save(obj, f, *args, **kwargs):
                name = os.path.basename(str(f))
                if name.startswith(".") and name.endswith(".tmp"):  # atomic write: ".<target>.<random>.tmp"
                    name = name[1:].rsplit(".", 2)[0]
                events.append(["save", name])
                return save(obj, f, *args, **kwargs)
            writer._write_outputs, torch.save = recording_write, recording_save
            gen_fusion.run(cfg)
        events.append(["world", torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1])
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    with open(f"{record}/rank{rank}.json", "w") as fh:
        json.dump(events, fh)
""")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(root: Path, work_dir: Path, *extra: str) -> list:
    lst = f"{root}/ImageSets/Segmentation"
    return [f"work_dir={work_dir}", f"data.root={root}", f"data.train_list={lst}/train.txt",
            f"data.infer_list={lst}/train.txt", f"data.val_list={lst}/val.txt", "num_workers=0", "device=cpu",
            "train_cls.crop=64", "train_cls.resize_long=[56,96]", "train_cls.batch_size=4",
            "train_cls.iterations=2", "train_cls.ckpt_every=1", "train_cls.val_every=0", "train_cls.log_every=1",
            "inference.scales=[0.5,1.0,1.5]", "fusion.overlays=2", *extra]


def run_ranks(argv: list, record: Path, world: int, timeout_s: float = TIMEOUT_S) -> list:
    """Run ``python argv...`` in ``world`` processes with a torchrun-style environment (one intra-op thread
    each, a free port); fails with a rank's output tail when one exits non-zero; returns the events each rank
    wrote to ``record/rank<r>.json``."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout_s)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {rank} of {argv[1:2]} failed (exit {p.returncode}):\n{out[-4000:]}"
    return [json.loads((record / f"rank{r}.json").read_text()) for r in range(world)]


def launch(stage: str, over: list, record: Path, world: int) -> list:
    """Run ``stage`` in ``world`` processes (torchrun-style environment); returns each rank's events."""
    record.mkdir(parents=True, exist_ok=True)
    script = record / "rank_main.py"
    script.write_text(RANK_SCRIPT)
    return run_ranks([str(script), stage, json.dumps(over), str(record)], record, world)


@pytest.fixture(scope="module")
def runs(tiny_voc, tmp_path_factory):
    """Stage 0 and stage 1 once in one process (in this process) and once over 2 gloo ranks."""
    from smaf.stages import gen_fusion, train_cls

    single, multi = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("ddp")
    cfg = load_config("demo", overrides(tiny_voc, single))
    train_cls.run(cfg)
    gen_fusion.run(cfg)
    events = {"train_cls": launch("train_cls", overrides(tiny_voc, multi), multi / "record_train", WORLD)}
    # stage 1 of the 2-rank run uses the single-process stage-0 model, so its outputs must equal the single run's
    fusion_over = overrides(tiny_voc, multi, f"fusion.checkpoint={single}/train_cls/final.pth")
    events["gen_fusion"] = launch("gen_fusion", fusion_over, multi / "record_fusion", WORLD)
    ids = (tiny_voc / "ImageSets/Segmentation/train.txt").read_text().split()
    return single, multi, events, ids


@pytest.mark.cost(35)
def test_ddp_step_gives_the_single_process_weights(runs):
    single, multi, events, _ = runs
    assert all(["world", WORLD] in e for e in events["train_cls"]), "the ranks did not join one process group"
    a, b = (read_checkpoint(d / "train_cls" / "final.pth")["model"] for d in (single, multi))
    assert a.keys() == b.keys()
    first = read_checkpoint(multi / "train_cls" / "checkpoints" / "iter_0000001.pth")
    assert len(first["rng"]) == WORLD  # every rank's RNG state is gathered into the checkpoint
    after_one = read_checkpoint(single / "train_cls" / "checkpoints" / "iter_0000001.pth")["model"]
    moved = 0
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
        moved += int(not torch.equal(a[key], after_one[key]))
    assert moved > 0, "the second iteration changed no weight: the comparison would be vacuous"
    log = (multi / "train_cls" / "log.txt").read_text()
    assert "world size 2" in log


def test_sharded_stage1_writes_every_image_once_with_single_process_outputs(runs):
    single, multi, events, ids = runs
    per_rank = [[e[1] for e in ev if e[0] == "write"] for ev in events["gen_fusion"]]
    assert all(len(w) == len(set(w)) for w in per_rank), "a rank wrote an image twice"
    assert not set(per_rank[0]) & set(per_rank[1]), "two ranks wrote the same image"
    assert sorted(per_rank[0] + per_rank[1]) == sorted(ids)
    assert all(len(w) == len(ids) // WORLD for w in per_rank)  # round-robin shards of 12 ids
    saves = [[e[1] for e in ev if e[0] == "save"] for ev in events["gen_fusion"]]
    assert saves == [["prototypes.pt"], []], f"prototypes.pt must be written by rank 0 only, once: {saves}"

    s_dir, m_dir = single / "fusion", multi / "fusion"
    for image_id in ids:
        sa, ma = (load_cam_dict(d / "cam_npy" / f"{image_id}.npy") for d in (s_dir, m_dir))
        assert sorted(sa) == sorted(ma), image_id
        for c in sa:
            np.testing.assert_allclose(ma[c], sa[c], atol=1e-5, err_msg=f"{image_id} class {c}")
        ps, pm = (load_label_png(d / "cam_png" / f"{image_id}.png") for d in (s_dir, m_dir))
        assert (ps == pm).mean() >= 0.999, image_id
        stats_s = load_cam_dict(s_dir / "proto_stats" / f"{image_id}.npy")
        stats_m = load_cam_dict(m_dir / "proto_stats" / f"{image_id}.npy")
        assert sorted(stats_s) == sorted(stats_m), image_id
    ps, pm = torch.load(s_dir / "prototypes.pt"), torch.load(m_dir / "prototypes.pt")
    torch.testing.assert_close(pm["prototypes"], ps["prototypes"], rtol=1e-5, atol=1e-5)
    assert torch.equal(pm["image_counts"], ps["image_counts"])
    assert (m_dir / "eval" / "cam_png.json").is_file()  # rank 0 evaluated once every rank had finished
