"""What every entry point needs: the expected-error base class and its one-line exit, logging, seeding, core
counts, and the stage scaffolding (output folder + resolved config, command-line entry).

Nothing here imports a stage: the core (training loop, CAM inference, refinement, evaluation) and the stages
all build on this module.

Expected errors (a bad config key, a missing file, an input that does not fit) derive from :class:`SmafError`
(the config, dataset, checkpoint and weights errors do). An entry point wraps its work in
:func:`expected_errors`, which prints ``error: <one line>`` and exits with :data:`EXIT_EXPECTED_ERROR`
(``SMAF_DEBUG=1`` shows the traceback instead).
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import sys
from pathlib import Path

#: Exit status of every entry point for an expected error (bad input, missing output of an earlier step);
#: argparse uses the same status for usage errors.
EXIT_EXPECTED_ERROR = 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class SmafError(Exception):
    """Base of every expected error: the message is one line naming the file or key and the fix."""


class StageError(SmafError, RuntimeError):
    """An expected failure of a stage (bad input, missing output of an earlier stage)."""


# Library code also raises these builtins for bad user input (a missing file, a value out of range); they are
# reported in one line as well.
_BUILTIN_EXPECTED = (FileNotFoundError, ValueError)


def one_line(text) -> str:
    """``text`` with its whitespace (newlines included) collapsed: the message of an ``error:`` line."""
    return " ".join(str(text).split())


_WORKER_RE = re.compile(r"^Caught (\w+) (in DataLoader worker process \d+)\.")
_LAST_LINE_RE = re.compile(r"^[\w.]+: (.*)$", re.S)


def error_message(err: BaseException) -> str:
    """The one-line message of an expected error. An error re-raised from a DataLoader worker carries the
    worker's whole traceback as its message (``Caught FileNotFoundError in DataLoader worker process 1.
    Original Traceback ...``); its original message (the last line, which names the file) is used instead."""
    text = str(err)
    found = _WORKER_RE.match(text)
    if found:
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        last = _LAST_LINE_RE.match(lines[-1].strip()) if lines else None
        if last:
            return f"{one_line(last.group(1))} ({found.group(2)})"
    return one_line(text) or err.__class__.__name__


@contextlib.contextmanager
def expected_errors():
    """Turn an expected error into one ``error: ...`` line on stderr and exit status :data:`EXIT_EXPECTED_ERROR`;
    with ``SMAF_DEBUG=1`` the error propagates with its traceback."""
    try:
        yield
    except (SmafError, *_BUILTIN_EXPECTED) as err:
        if os.environ.get("SMAF_DEBUG"):
            raise
        print(f"error: {error_message(err)}", file=sys.stderr)
        sys.exit(EXIT_EXPECTED_ERROR)


def get_logger(name: str, log_file: Path | None = None) -> logging.Logger:
    """A logger printing readable lines to stderr (rank 0 only) and, when given, to ``log_file``."""
    from . import dist

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


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    import numpy as np
    import torch

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


def pick(value, default):
    """``value`` unless it is empty ('' or None), then ``default``."""
    return default if value in ("", None) else value


# ------------------------------------------------------------------------------------------- stages
def check_positive(sect, section: str, keys=(), non_negative=()) -> None:
    """ConfigError naming ``<section>.<key>`` for a value of ``keys`` below 1 or of ``non_negative`` below 0
    (values that must be whole numbers)."""
    from .config import ConfigError

    for key, low in [(k, 1) for k in keys] + [(k, 0) for k in non_negative]:
        if key not in sect:
            continue
        value = sect[key]
        try:
            number = int(value)
            ok = number == float(value) and number >= low
        except (TypeError, ValueError):
            ok = False
        if not ok:
            what = "a whole number >= 1" if low else "a whole number >= 0 (0 disables it)"
            raise ConfigError(f"{section}.{key}={value!r}: must be {what}")


def prepare_output(cfg, section: str, name: str | None = None, layout=None):
    """Set up a stage whose outputs go to the folder of config section ``section`` (:class:`smaf.run_layout.RunLayout`).

    Checks the dataset root, joins the process group (under torchrun), creates the folder, removes the temp
    files an interrupted run left in it, saves the resolved config there (rank 0), warns when the folder's
    outputs were made under another config, and returns ``(out_dir, logger, device, layout)``. A bad dataset
    root fails before anything is written; a stage that checks more of its inputs first (ids, images,
    checkpoints) builds the layout itself and passes it as ``layout``."""
    import yaml

    from . import dist
    from .config import config_changes, save_config
    from .data.voc import VOCLayout
    from .io import remove_stale_temp_files
    from .run_layout import RunLayout

    layout = layout if layout is not None else VOCLayout.from_config(cfg)
    device = dist.init_from_env(cfg.device)
    out_dir = RunLayout(cfg).stage_dir(section)
    changes, stale = [], []
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        stale = remove_stale_temp_files(out_dir)
        previous = out_dir / "config.yaml"
        if previous.is_file():
            try:
                changes = config_changes(yaml.safe_load(previous.read_text()) or {}, cfg.to_dict())
            except yaml.YAMLError:
                changes = [f"{previous} is not valid YAML"]
        save_config(cfg, out_dir)
    dist.barrier()
    logger = get_logger(name or section, out_dir / "log.txt")
    logger.info("output folder %s | device %s | world size %d", out_dir, device, dist.world_size())
    if stale:
        logger.info("removed %d temp file(s) an interrupted run left (e.g. %s)", len(stale), stale[0])
    if changes:
        # Finished outputs are reused (resume), so outputs made under the old settings would silently stay.
        logger.warning("the config differs from the one this folder's outputs were made with (%s); finished "
                       "outputs are kept and reused: to regenerate them, delete %s or set another out_subdir / "
                       "work_dir", "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6
                                                             else ""), out_dir)
    return out_dir, logger, device, layout


def stage_main(run, description: str, argv=None) -> None:
    """Command-line entry of a stage: ``--config NAME key=value ...``; expected errors exit with one line."""
    import torch

    from . import dist
    from .config import parse_cli

    with expected_errors():
        cfg = parse_cli(argv, description)
        try:
            run(cfg)
        finally:
            if dist.is_distributed():
                torch.distributed.destroy_process_group()
