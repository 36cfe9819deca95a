"""Writing files (smaf/io.py): an error of an :class:`AsyncWriter` job reaches the caller (the next ``submit``, or
``close`` / the end of the ``with`` block) and the other jobs still finish; a failed :func:`atomic_save` leaves
no temp file and the previous content of the target intact."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from smaf.checkpoint import read_checkpoint, save_checkpoint
from smaf.io import AsyncWriter, atomic_save


class DiskFull(OSError):
    pass


def _fail(error: BaseException):
    raise error


def _write(path: Path, text: str):
    path.write_text(text)


# ---------------------------------------------------------------------------------------- AsyncWriter
def test_a_job_error_is_raised_by_the_next_submit(tmp_path):
    error = DiskFull("no space left on device")
    ran = threading.Event()
    writer = AsyncWriter(threads=1)
    writer.submit(_fail, error)
    writer.submit(ran.set)              # one thread, in order: when this ran, the failure was recorded
    assert ran.wait(10)
    with pytest.raises(DiskFull) as info:
        writer.submit(_write, tmp_path / "late.txt", "x")
    assert info.value is error
    assert not (tmp_path / "late.txt").exists()        # refused, not queued
    with pytest.raises(DiskFull):                      # and close() still reports it
        writer.close()


def test_close_waits_for_every_job_then_raises_the_first_error(tmp_path):
    first, second = DiskFull("first"), ValueError("second")
    gate = threading.Event()
    writer = AsyncWriter(threads=1, max_pending=8)
    writer.submit(gate.wait, 10)        # hold the worker so that every job is queued before any runs
    writer.submit(_fail, first)
    writer.submit(_write, tmp_path / "a.txt", "a")
    writer.submit(_fail, second)
    writer.submit(_write, tmp_path / "b.txt", "b")
    gate.set()
    with pytest.raises(DiskFull) as info:
        writer.close()
    assert info.value is first
    assert (tmp_path / "a.txt").read_text() == "a" and (tmp_path / "b.txt").read_text() == "b"


def test_the_with_block_raises_a_job_error_on_exit(tmp_path):
    error = DiskFull("disk gone")
    with pytest.raises(DiskFull) as info:
        with AsyncWriter(threads=2) as writer:
            for i in range(6):
                writer.submit(_write, tmp_path / f"{i}.txt", str(i))
            writer.submit(_fail, error)
    assert info.value is error
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{i}.txt" for i in range(6)]


def test_a_writer_without_errors_closes_quietly(tmp_path):
    with AsyncWriter(threads=2, max_pending=2) as writer:       # more jobs than the queue holds: submit waits
        for i in range(10):
            writer.submit(_write, tmp_path / f"{i}.txt", str(i))
    assert sorted(int(p.stem) for p in tmp_path.iterdir()) == list(range(10))


# ---------------------------------------------------------------------------------------- atomic_save
def _partial_then_fail(error: BaseException):
    def write(tmp):
        Path(tmp).write_text("half a fi")
        raise error
    return write


@pytest.mark.parametrize("error", [DiskFull("no space"), KeyboardInterrupt()], ids=["oserror", "interrupt"])
def test_a_failed_write_leaves_no_temp_file_and_the_old_target(tmp_path, error):
    target = tmp_path / "out" / "result.txt"
    target.parent.mkdir()
    target.write_text("previous")
    with pytest.raises(type(error)):
        atomic_save(target, _partial_then_fail(error))
    assert target.read_text() == "previous"
    assert sorted(os.listdir(target.parent)) == ["result.txt"]


def test_a_failed_write_of_a_new_file_leaves_nothing(tmp_path):
    target = tmp_path / "new" / "result.txt"
    with pytest.raises(DiskFull):
        atomic_save(target, _partial_then_fail(DiskFull("no space")))
    assert os.listdir(target.parent) == []


def test_a_failed_rename_leaves_no_temp_file_and_the_old_target(tmp_path, monkeypatch):
    target = tmp_path / "result.txt"
    target.write_text("previous")

    def no_rename(src, dst):
        raise PermissionError(f"cannot replace {dst}")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(PermissionError):
        atomic_save(target, lambda tmp: Path(tmp).write_text("new"))
    monkeypatch.undo()
    assert target.read_text() == "previous" and os.listdir(tmp_path) == ["result.txt"]


def test_a_checkpoint_save_that_fails_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """torch.save dies half-way (disk full): the checkpoint on disk is still the previous, readable one."""
    net = torch.nn.Conv2d(3, 2, 1)
    meta = {"arch": "x", "args": {}}
    path = save_checkpoint(tmp_path / "final.pth", net, meta=meta, iteration=1)
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:             # cut what was written, then fail
            fh.truncate(100)
        raise DiskFull("no space left on device")

    monkeypatch.setattr(torch, "save", dying_save)
    with torch.no_grad():
        net.weight.add_(1.0)
    with pytest.raises(DiskFull):
        save_checkpoint(path, net, meta=meta, iteration=2)
    monkeypatch.undo()
    assert read_checkpoint(path)["iteration"] == 1 and os.listdir(tmp_path) == ["final.pth"]


def test_a_successful_write_replaces_the_target_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "result.txt"
    target.write_text("previous")
    seen = []

    def write(tmp):
        seen.append(Path(tmp))
        Path(tmp).write_text("new")

    assert atomic_save(target, write) == target
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["result.txt"]
    assert seen[0].parent == tmp_path and seen[0] != target    # written beside the target, then renamed
