# Shared by the stage scripts: CONFIG (packaged name or YAML path, default voc12), NUM_GPUS (>1 launches
# torchrun), extra key=value arguments passed through to the stage.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
CONFIG="${CONFIG:-voc12}"
NUM_GPUS="${NUM_GPUS:-1}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"

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
  check_dataset "$@"
  if [ "$NUM_GPUS" -gt 1 ]; then
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NUM_GPUS" -m "$module" --config "$CONFIG" "$@"
  else
    "$PYTHON" -m "$module" --config "$CONFIG" "$@"
  fi
}
