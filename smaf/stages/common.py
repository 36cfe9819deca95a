"""What every stage does the same way: logging, output folders, device, list resolution, error exits."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

import torch
import yaml

from .. import dist
from ..config import ConfigError, config_changes, parse_cli, save_config
from ..data.voc import DatasetError, VOCLayout

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class StageError(RuntimeError):
    """An expected failure of a stage (bad input, missing output of an earlier stage)."""


def get_logger(name: str, log_file: Path | None = None) -> logging.Logger:
    """A logger printing readable lines to stderr (rank 0 only) and, when given, to ``log_file``."""
    logger = logging.getLogger(f"smaf.{name}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    if dist.is_main():
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        logger.addHandler(console)
        if log_file is not None:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            fh = logging.FileHandler(log_file)
            fh.setFormatter(logging.Formatter(LOG_FORMAT))
            logger.addHandler(fh)
    return logger


def prepare_output(cfg, subdir: str, name: str):
    """Check the dataset root, join the process group (under torchrun), create ``<work_dir>/<subdir>``, save
    the resolved config there (rank 0) and return (out_dir, logger, device, layout). A bad dataset root fails
    before anything is written."""
    layout = layout_from(cfg)
    device = dist.init_from_env(cfg.device)
    out_dir = Path(cfg.work_dir) / subdir
    changes = []
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        previous = out_dir / "config.yaml"
        if previous.is_file():
            try:
                changes = config_changes(yaml.safe_load(previous.read_text()) or {}, cfg.to_dict())
            except yaml.YAMLError:
                changes = [f"{previous} is not valid YAML"]
        save_config(cfg, out_dir)
    dist.barrier()
    logger = get_logger(name, out_dir / "log.txt")
    logger.info("output folder %s | device %s | world size %d", out_dir, device, dist.world_size())
    if changes:
        # Finished outputs are reused (resume), so outputs made under the old settings would silently stay.
        logger.warning("the config differs from the one this folder's outputs were made with (%s); finished "
                       "outputs are kept and reused: to regenerate them, delete %s or set another out_subdir / "
                       "work_dir", "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6
                                                             else ""), out_dir)
    return out_dir, logger, device, layout


def layout_from(cfg) -> VOCLayout:
    return VOCLayout.from_config(cfg)


def pick(value, default):
    """``value`` unless it is empty ('' or None), then ``default``."""
    return default if value in ("", None) else value


def set_seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_workers(requested: int) -> int:
    """DataLoader workers: ``requested`` capped by the cores this process may use (0 = in-process)."""
    return max(0, min(int(requested), available_cores()))


EXPECTED_ERRORS = (ConfigError, DatasetError, StageError, FileNotFoundError, ValueError)


@contextlib.contextmanager
def exit_on_expected_errors():
    """Turn an expected error (bad config, dataset, checkpoint or weights file) into one ``error: ...`` line
    and exit status 1; set SMAF_DEBUG=1 to see the traceback instead."""
    from ..checkpoint import CheckpointError
    from ..models.weights import WeightsError

    try:
        yield
    except (*EXPECTED_ERRORS, CheckpointError, WeightsError) as err:
        if os.environ.get("SMAF_DEBUG"):
            raise
        msg = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        sys.exit(f"error: {msg}")


def stage_main(run, description: str, argv=None) -> None:
    """Command-line entry of a stage: ``--config NAME key=value ...``; expected errors exit with one line."""
    cfg = parse_cli(argv, description)
    try:
        with exit_on_expected_errors():
            run(cfg)
    finally:
        if dist.is_distributed():
            torch.distributed.destroy_process_group()
