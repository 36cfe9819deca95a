"""The entry points under script/: --help starts no work, the shared bootstrap (script/_common.sh) picks the
environment the README describes and sets up .venv only when none works, and the pipeline picture is drawn.

No test creates a real virtualenv or runs pip: fake interpreters (bash scripts in tmp_path that log their
arguments) stand in for Python, and the set-up path runs in a copy of script/ in tmp_path."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT_DIR = REPO_ROOT / "script"
SCRIPTS = sorted(p.name for p in SCRIPT_DIR.glob("*.sh") if not p.name.startswith("_"))
TIMEOUT_S = 60

SET_UP_LINES = ("setting up .venv", "[1/3]", "[2/3] pip install", "[3/3]")


def make_fake_python(path: Path, log: Path, import_ok: bool = True, make_venv: bool = False) -> Path:
    """A bash script standing in for an interpreter: logs its arguments to ``log``; ``-c ...`` (the import
    check) succeeds when ``import_ok``, else prints a traceback; with ``make_venv``, ``-m venv --clear DIR``
    makes DIR/bin/python a fake that imports the project."""
    template = path.parent / "venv_python"
    venv_python = (
        'if [ "$1 $2" = "-m venv" ]; then dir="${@: -1}"; mkdir -p "$dir/bin"; '
        f'cp "{template}" "$dir/bin/python"; exit 0; fi\n' if make_venv else "")
    check = ("exit 0" if import_ok else
             "echo 'Traceback (most recent call last):' >&2; "
             "echo \"ModuleNotFoundError: No module named 'torch'\" >&2; exit 1")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""#!/usr/bin/env bash
echo "$0 $*" >> "{log}"
{venv_python}if [ "${{1:-}}" = "-c" ]; then {check}; fi
if [ "${{1:-}}" = "--version" ]; then echo "Python 3.0-fake"; fi
exit 0
""")
    path.chmod(0o755)
    return path


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV", "CONFIG", "NUM_GPUS")}
    env.update(extra)
    return env


def run_script(script: Path, *args, env=None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=env if env is not None else clean_env(), cwd=cwd)


def copy_of_scripts(tmp_path: Path) -> Path:
    """A repository root in tmp_path holding script/*.sh and a requirements.txt, and nothing else."""
    root = tmp_path / "repo"
    shutil.copytree(SCRIPT_DIR, root / "script")
    (root / "requirements.txt").write_text("-e .\n")
    return root


# ------------------------------------------------------------------------------------- --help
def test_every_script_is_covered():
    assert {"demo.sh", "test.sh", "train_cls.sh", "gen_fusion.sh", "train_fusion.sh", "gen_pm.sh",
            "crf.sh"} <= set(SCRIPTS)


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_help_prints_purpose_and_starts_no_work(script, flag, tmp_path):
    root = copy_of_scripts(tmp_path)
    log = tmp_path / "python.log"
    fake = make_fake_python(tmp_path / "bin" / "python", log)
    result = run_script(root / "script" / script, flag, env=clean_env(PYTHON=str(fake), TMPDIR=str(tmp_path)),
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    purpose = (SCRIPT_DIR / script).read_text().splitlines()[1].lstrip("# ").strip()
    lines = result.stdout.splitlines()
    assert lines and lines[0] == purpose
    for word in ("usage", "inputs", "outputs", "keys"):
        assert word in result.stdout.lower(), f"{script} --help does not name its {word}"
    assert result.stderr == ""
    assert not log.exists(), f"{script} {flag} started Python: {log.read_text()}"
    assert sorted(p.name for p in root.iterdir()) == ["requirements.txt", "script"]   # no work_dirs/, .venv, data


# ------------------------------------------------------------------------------------- the bootstrap
def test_python_from_the_environment_is_used_as_is(tmp_path):
    log = tmp_path / "python.log"
    fake = make_fake_python(tmp_path / "bin" / "python", log)
    result = run_script(SCRIPT_DIR / "crf.sh", "crf.workers=1", env=clean_env(PYTHON=str(fake)))
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert any("import smaf, torch" in call for call in calls)
    assert calls[-1] == f"{fake} -m smaf.stages.crf --config voc12 crf.workers=1"
    assert not any(line in result.stderr for line in SET_UP_LINES)


def test_test_sh_runs_pytest_with_the_arguments(tmp_path):
    log = tmp_path / "python.log"
    fake = make_fake_python(tmp_path / "bin" / "python", log)
    result = run_script(SCRIPT_DIR / "test.sh", "-q", "-k", "crf", env=clean_env(PYTHON=str(fake)))
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines()[-1] == f"{fake} -m pytest -q -k crf"


def test_python_that_cannot_import_the_project_fails_in_one_line(tmp_path):
    log = tmp_path / "python.log"
    fake = make_fake_python(tmp_path / "bin" / "python", log, import_ok=False)
    result = run_script(SCRIPT_DIR / "gen_pm.sh", env=clean_env(PYTHON=str(fake)))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"error: PYTHON={fake} cannot import")
    assert "No module named 'torch'" in result.stderr and "Traceback" not in result.stderr
    assert "pip install -r requirements.txt" in result.stderr    # names the fix
    assert all(" -c " in call for call in log.read_text().splitlines())   # nothing but the check ran


def test_missing_python_fails_in_one_line(tmp_path):
    result = run_script(SCRIPT_DIR / "demo.sh", env=clean_env(PYTHON=str(tmp_path / "no-such-python")))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: PYTHON=")


def test_active_virtualenv_is_used(tmp_path):
    log = tmp_path / "python.log"
    fake = make_fake_python(tmp_path / "venv" / "bin" / "python", log)
    result = run_script(SCRIPT_DIR / "test.sh", "--co", env=clean_env(VIRTUAL_ENV=str(tmp_path / "venv")))
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines()[-1] == f"{fake} -m pytest --co"


def test_fresh_clone_sets_up_venv_once_then_installs_nothing(tmp_path):
    """No environment can import the project: the first run creates .venv and installs requirements.txt (one
    line per step), the second uses .venv and installs nothing."""
    root = copy_of_scripts(tmp_path)
    log = tmp_path / "python.log"
    bin_dir = tmp_path / "bin"
    make_fake_python(bin_dir / "venv_python", log)
    for name in ("python3", "python"):
        make_fake_python(bin_dir / name, log, import_ok=False, make_venv=True)
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))
    venv_python = root / ".venv" / "bin" / "python"

    first = run_script(root / "script" / "test.sh", "-x", env=env)
    assert first.returncode == 0, first.stderr
    for line in SET_UP_LINES:
        assert line in first.stderr
    assert ".venv is ready" in first.stderr
    calls = log.read_text().splitlines()
    assert f"{venv_python} -m pip install -r requirements.txt" in calls
    assert calls[-1] == f"{venv_python} -m pytest -x"
    assert (root / ".venv" / "install.log").is_file()
    assert not (root / ".venv" / "install.incomplete").exists()

    log.unlink()
    second = run_script(root / "script" / "test.sh", "-x", env=env)
    assert second.returncode == 0, second.stderr
    assert second.stderr == ""
    calls = log.read_text().splitlines()
    assert not any("pip" in call or "venv" in call.split()[1:] for call in calls)
    assert calls[-1] == f"{venv_python} -m pytest -x"


def test_interrupted_set_up_is_repaired_not_used(tmp_path):
    root = copy_of_scripts(tmp_path)
    log = tmp_path / "python.log"
    venv_python = make_fake_python(root / ".venv" / "bin" / "python", log)   # imports fine, but ...
    (root / ".venv" / "install.incomplete").touch()                          # ... pip never finished
    env = clean_env(TMPDIR=str(tmp_path))
    result = run_script(root / "script" / "test.sh", env=env)
    assert result.returncode == 0, result.stderr
    assert "did not finish" in result.stderr and "kept the existing one" in result.stderr
    calls = log.read_text().splitlines()
    assert f"{venv_python} -m pip install -r requirements.txt" in calls
    assert calls[-1] == f"{venv_python} -m pytest"
    assert not (root / ".venv" / "install.incomplete").exists()


def test_failed_install_shows_the_log_tail(tmp_path):
    root = copy_of_scripts(tmp_path)
    log = tmp_path / "python.log"
    venv_python = root / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text(f"""#!/usr/bin/env bash
echo "$0 $*" >> "{log}"
if [ "$1 $2" = "-m pip" ]; then echo "ERROR: No matching distribution found for torch==2.13.0"; exit 1; fi
if [ "$1" = "-c" ]; then [ -z "$2" ]; exit $?; fi
exit 0
""")
    venv_python.chmod(0o755)
    result = run_script(root / "script" / "demo.sh", env=clean_env(TMPDIR=str(tmp_path)))
    assert result.returncode == 1
    assert "error: pip install -r requirements.txt into .venv failed" in result.stderr
    assert "No matching distribution found for torch==2.13.0" in result.stderr
    assert (root / ".venv" / "install.incomplete").exists()      # the next run sets it up again
    assert not any("smaf.pipeline" in call for call in log.read_text().splitlines())


# ------------------------------------------------------------------------------------- the picture
def test_draw_pipeline_writes_png_of_expected_size(tmp_path):
    from smaf.tools.draw_pipeline import DEFAULT_WIDTH, draw_pipeline, main

    drawn = draw_pipeline()
    assert drawn.shape[1] == DEFAULT_WIDTH == 900 and 500 < drawn.shape[0] < 1200
    out = tmp_path / "docs" / "pipeline.png"
    assert main(["--out", str(out)]) == 0
    written = cv2.imread(str(out))
    assert written is not None and written.shape == drawn.shape
    assert main(["--out", str(tmp_path / "small.png"), "--width", "450"]) == 0
    assert cv2.imread(str(tmp_path / "small.png")).shape[1] == 450


def test_readme_picture_is_current():
    """docs/pipeline.png is what the drawing module makes from the current run layout."""
    from smaf.tools.draw_pipeline import DEFAULT_OUT, draw_pipeline

    committed = cv2.imread(str(DEFAULT_OUT))
    assert committed is not None, f"{DEFAULT_OUT} is missing: run python -m smaf.tools.draw_pipeline"
    drawn = draw_pipeline()
    stale = f"{DEFAULT_OUT} is out of date: run python -m smaf.tools.draw_pipeline"
    assert committed.shape == drawn.shape, stale
    differing = np.abs(committed.astype(np.int16) - drawn.astype(np.int16)).max(axis=2) > 48
    assert differing.mean() < 5e-4, stale
