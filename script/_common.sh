# Shared by every script under script/ (sourced, never run): answers --help, finds or sets up the Python
# environment, and runs the stages. CONFIG (packaged name or YAML path, default voc12), NUM_GPUS (>1 launches
# torchrun), extra key=value arguments passed through to the stage.
#
# The Python environment (bootstrap_python): the first of
#   1. $PYTHON, used as is (an error in one line when it cannot import the project);
#   2. the active virtualenv ($VIRTUAL_ENV/bin/python);
#   3. <repo>/.venv/bin/python;
#   4. python3 / python on PATH;
# that can `import smaf, torch` (the project installed with `-e .` from requirements.txt, torch present).
# When none can, it creates <repo>/.venv with `python3 -m venv` and installs requirements.txt into it, as the
# README's manual set-up does: one line per step with its time, pip's own output in .venv/install.log (its
# tail is shown on failure). A .venv whose install did not finish (.venv/install.incomplete) or that cannot
# import the project is set up again, never used as it is.
set -euo pipefail

SCRIPT_FILE="${BASH_SOURCE[1]:-$0}"
SCRIPT_FILE="$(cd "$(dirname "$SCRIPT_FILE")" && pwd)/$(basename "$SCRIPT_FILE")"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="$REPO_ROOT/.venv"
VENV_INSTALL_LOG="$VENV_DIR/install.log"
VENV_INCOMPLETE_MARK="$VENV_DIR/install.incomplete"

# The calling script's header comment (the lines after the shebang up to the first line that is not a
# comment), then how the environment is chosen. Starts no Python.
print_script_help() {
  awk 'NR == 1 && /^#!/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$SCRIPT_FILE"
  cat <<'HELP'

Python: $PYTHON if set, else the active virtualenv, else .venv, else python3 on PATH, whichever first can
  `import smaf, torch`; when none can, the first run creates .venv and installs requirements.txt into it
  (about 2 minutes on a 2-core CPU, once; pip's output in .venv/install.log). Later runs install nothing.
HELP
}

# --help / -h as the first argument: the help, and nothing else (no set-up, no work).
if [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  print_script_help
  exit 0
fi

cd "$REPO_ROOT"
CONFIG="${CONFIG:-voc12}"
NUM_GPUS="${NUM_GPUS:-1}"
PYTHON="${PYTHON:-}"

# The import that decides whether an interpreter is set up: smaf as installed (not merely the repo folder on
# sys.path, which any interpreter started here would see) and torch.
PROJECT_IMPORT_CHECK='import sys; sys.path = [p for p in sys.path if p not in ("", ".")]; import smaf, torch'

# Prints the last line of the import check's error (empty and status 0 when the interpreter is set up).
project_import_error() {
  local interpreter="$1" output
  if output="$("$interpreter" -c "$PROJECT_IMPORT_CHECK" 2>&1)"; then
    return 0
  fi
  printf '%s\n' "${output:-exit status non-zero, no message}" | tail -n 1
  return 1
}

can_import_project() {
  project_import_error "$1" >/dev/null 2>&1
}

elapsed_since() {
  echo "$(( $(date +%s) - $1 )) s"
}

# error: ... plus the last lines of a log, then exit 1.
fail_with_log() {
  local message="$1" log_file="$2"
  echo "error: $message" >&2
  if [ -s "$log_file" ]; then
    echo "last lines of $log_file:" >&2
    tail -n 25 "$log_file" | sed 's/^/  /' >&2
  fi
  exit 1
}

# Creates (or repairs) .venv and installs requirements.txt into it; sets PYTHON.
set_up_venv() {
  local reason="$1" base_python step_start setup_start venv_output
  base_python="$(command -v python3 || true)"
  if [ -z "$base_python" ]; then
    echo "error: no python3 on PATH to create .venv: install Python 3.9 or newer, or set PYTHON to an interpreter with the project installed" >&2
    exit 1
  fi
  setup_start="$(date +%s)"
  echo "smaf: $reason; setting up .venv (once, about 2 minutes on a 2-core CPU; pip's output in .venv/install.log)" >&2
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "smaf: note: a GPU is present, but .venv gets the CPU build of torch that requirements.txt pins; for the CUDA build see the manual set-up in README.md" >&2
  fi

  step_start="$(date +%s)"
  if [ -x "$VENV_DIR/bin/python" ] && "$VENV_DIR/bin/python" -c "" >/dev/null 2>&1; then
    echo "smaf: [1/3] python3 -m venv .venv: kept the existing one" >&2
  else
    printf 'smaf: [1/3] python3 -m venv .venv (%s) ... ' "$("$base_python" --version 2>&1)" >&2
    venv_output="$(mktemp)"
    if ! "$base_python" -m venv --clear "$VENV_DIR" >"$venv_output" 2>&1; then
      echo "failed" >&2
      fail_with_log "python3 -m venv .venv failed: install Python's venv module (Debian/Ubuntu: apt-get install python3-venv), then run the script again" "$venv_output"
    fi
    cat "$venv_output" >"$VENV_INSTALL_LOG"
    rm -f "$venv_output"
    echo "$(elapsed_since "$step_start")" >&2
  fi
  touch "$VENV_INCOMPLETE_MARK"

  step_start="$(date +%s)"
  printf 'smaf: [2/3] pip install -r requirements.txt ... ' >&2
  echo "== $(date -u '+%Y-%m-%d %H:%M:%S UTC') pip install -r requirements.txt" >>"$VENV_INSTALL_LOG"
  if ! "$VENV_DIR/bin/python" -m pip install -r requirements.txt >>"$VENV_INSTALL_LOG" 2>&1; then
    echo "failed" >&2
    fail_with_log "pip install -r requirements.txt into .venv failed: fix the cause shown below, then run the script again (it resumes the set-up)" "$VENV_INSTALL_LOG"
  fi
  echo "$(elapsed_since "$step_start")" >&2

  step_start="$(date +%s)"
  printf 'smaf: [3/3] check: import smaf, torch ... ' >&2
  local import_error
  if ! import_error="$(project_import_error "$VENV_DIR/bin/python")"; then
    echo "failed" >&2
    echo "$import_error" >>"$VENV_INSTALL_LOG"
    fail_with_log ".venv cannot import smaf and torch after the install ($import_error): delete .venv and run the script again" "$VENV_INSTALL_LOG"
  fi
  echo "$(elapsed_since "$step_start")" >&2
  rm -f "$VENV_INCOMPLETE_MARK"
  echo "smaf: .venv is ready ($(elapsed_since "$setup_start") in all); later runs use it and install nothing" >&2
  PYTHON="$VENV_DIR/bin/python"
}

# The .venv is usable: the install finished and it imports the project.
venv_is_ready() {
  [ ! -e "$VENV_INCOMPLETE_MARK" ] && [ -x "$VENV_DIR/bin/python" ] && can_import_project "$VENV_DIR/bin/python"
}

# Sets PYTHON to an interpreter that imports the project, setting up .venv when none does (see the top).
bootstrap_python() {
  local import_error candidate
  if [ -n "$PYTHON" ]; then
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
      echo "error: PYTHON=$PYTHON is not an executable: set PYTHON to an interpreter with the project installed, or unset it to let the script set up .venv" >&2
      exit 1
    fi
    if ! import_error="$(project_import_error "$PYTHON")"; then
      echo "error: PYTHON=$PYTHON cannot import smaf and torch ($import_error): install the project into it (\"$PYTHON\" -m pip install -r requirements.txt), or unset PYTHON to let the script set up .venv" >&2
      exit 1
    fi
    export PYTHON
    return 0
  fi
  if [ -n "${VIRTUAL_ENV:-}" ] && [ "$VIRTUAL_ENV" != "$VENV_DIR" ]; then
    if can_import_project "$VIRTUAL_ENV/bin/python"; then
      PYTHON="$VIRTUAL_ENV/bin/python"
      export PYTHON
      return 0
    fi
    echo "smaf: note: the active virtualenv $VIRTUAL_ENV cannot import smaf and torch; not using it" >&2
  fi
  if venv_is_ready; then
    PYTHON="$VENV_DIR/bin/python"
    export PYTHON
    return 0
  fi
  if [ ! -d "$VENV_DIR" ]; then
    for candidate in python3 python; do
      candidate="$(command -v "$candidate" || true)"
      if [ -n "$candidate" ] && can_import_project "$candidate"; then
        PYTHON="$candidate"
        export PYTHON
        return 0
      fi
    done
  fi

  local reason="no Python here can import smaf and torch"
  if [ -e "$VENV_INCOMPLETE_MARK" ]; then
    reason="the last set-up of .venv did not finish"
  elif [ -d "$VENV_DIR" ]; then
    reason=".venv cannot import smaf and torch"
  fi
  # One set-up at a time per repository: a script started meanwhile waits, then uses the result. The lock is
  # released before the job starts (its processes would otherwise inherit and hold it).
  local lock_file venv_lock_fd=""
  lock_file="${TMPDIR:-/tmp}/smaf-venv-$(printf '%s' "$REPO_ROOT" | cksum | cut -d ' ' -f 1).lock"
  if command -v flock >/dev/null 2>&1 && { : >>"$lock_file"; } 2>/dev/null; then
    exec {venv_lock_fd}>>"$lock_file"
    if ! flock -n "$venv_lock_fd"; then
      echo "smaf: another script is setting up .venv; waiting for it" >&2
      flock "$venv_lock_fd"
    fi
  fi
  if [ -n "$venv_lock_fd" ] && venv_is_ready; then
    PYTHON="$VENV_DIR/bin/python"
  else
    set_up_venv "$reason"
  fi
  if [ -n "$venv_lock_fd" ]; then
    exec {venv_lock_fd}>&-
  fi
  export PYTHON
}

# Fail in one line, before any process starts, when the dataset root is missing.
check_dataset() {
  "$PYTHON" - "$CONFIG" "$@" <<'PY'
import sys
from smaf.config import ConfigError, load_config
from smaf.data.voc import DatasetError, VOCLayout
try:
    cfg = load_config(sys.argv[1], [a for a in sys.argv[2:] if "=" in a])
    VOCLayout.from_config(cfg)
except (ConfigError, DatasetError) as err:
    sys.exit(f"error: {err}")
PY
}

run_stage() {
  local module="$1"; shift
  bootstrap_python
  check_dataset "$@"
  if [ "$NUM_GPUS" -gt 1 ]; then
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NUM_GPUS" -m "$module" --config "$CONFIG" "$@"
  else
    "$PYTHON" -m "$module" --config "$CONFIG" "$@"
  fi
}
