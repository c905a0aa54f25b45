#!/usr/bin/env bash
# The command for a lent GPU machine (the device tool's run, with carry [".whl"]): installs
# the carried wheels its image lacks (`make gpu-wheels` puts them in .whl/), then runs
# experiments/gpu_session.py, whose outputs go to $OUT (what the run brings back).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
if compgen -G ".whl/*.whl" >/dev/null; then
  if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/gpu_site .whl/*.whl >/tmp/gpu_wheels.log 2>&1; then
    mkdir -p "$out"
    { echo "# GPU session: the carried wheels did not install (nothing was measured)"; echo
      echo "python3: $(python3 --version 2>&1); .whl: $(ls .whl | tr '\n' ' ')"; echo
      cat /tmp/gpu_wheels.log; } | tee "$out/summary.md"
    exit 1
  fi
  export PYTHONPATH="/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 experiments/gpu_session.py --out "$out" "$@"
