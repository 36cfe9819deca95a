#!/usr/bin/env bash
# The real-data benchmark on the Oxford-IIIT Pet subset: bash script/bench_real.sh pets (kept for old commands).
exec bash "$(dirname "${BASH_SOURCE[0]}")/bench_real.sh" pets "$@"
