#!/usr/bin/env bash
# Throughput benchmark: fused maps (our path vs a per-image baseline, outputs compared), CRF (1 worker vs a
# pool), evaluation, training steps of stages 0 and 2 with peak memory, and the affinity refiners (PAR, random
# walk) on VOC-sized images. Prints a table and writes JSON.
#
# Usage: bash script/bench.sh [options]
# Keys (options; all of them: .venv/bin/python -m smaf.bench --help):
#   --sections a,b,c,d,e    subset to run: a fused maps, b CRF, c evaluation, d training, e refiners (default all)
#   --backbones efficientnet_lite0,resnet38d
#   --images N              images (default 16 on CPU, 64 on CUDA); --r38-images N for ResNet-38 (CPU: 1)
#   --size L / --r38-size L long side of the images (CPU 160, CUDA 500)
#   --repeats N             timed runs per measure, median reported (default 3; a warm-up is excluded)
#   --out PATH              JSON report (default work_dirs/bench/bench.json)
#   --device auto|cpu|cuda  (auto: CUDA when available)
# Inputs: ../shared/data/pets (PETS_ROOT overrides; SMAF_SHARED moves ../shared), else a synthetic set;
#   --data ROOT [--list FILE] for any VOC-layout root.
# Outputs: the table on stdout, the JSON report (--out).
# Environment: OMP_WAIT_POLICY defaults to PASSIVE here: on a shared CPU machine spinning OpenMP threads of
#   several processes make every op wait for a scheduler tick (measured up to 60x slower forwards under load);
#   both paths of every comparison run under the same policy, and the JSON records it. Set
#   OMP_WAIT_POLICY=ACTIVE (or empty) to measure the OpenMP default instead.
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"
if [ -z "${OMP_WAIT_POLICY+x}" ]; then
  export OMP_WAIT_POLICY=PASSIVE
fi
bootstrap_python
exec "$PYTHON" -m smaf.bench "$@"
