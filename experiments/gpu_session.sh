#!/usr/bin/env bash
# The command for a lent GPU machine (the device tool's run, with carry [".whl"]): installs
# the carried wheels its image lacks (`make gpu-wheels` puts them in .whl/), then runs
# experiments/gpu_session.py, whose outputs go to $OUT (what the run brings back).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_site .whl/*.whl
  export PYTHONPATH="/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
exec python3 experiments/gpu_session.py "$@"
