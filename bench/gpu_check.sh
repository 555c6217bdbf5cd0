#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): install from the working tree, then run every step on the GPU
# and write bench/results/gpu_check.json. Budget: 8 minutes on one modern GPU, nothing reachable.
#
#   bash bench/gpu_check.sh            # on the GPU machine, from the repository root
#   bash bench/gpu_check.sh --smoke    # CPU, tiny settings: the plumbing only (tests/test_bench.py)
#
# Nothing is downloaded. Python packages the machine lacks come from wheels carried in the working
# tree: .whl/ (ours: hydra-core, omegaconf, antlr4, datasets, trl, bitsandbytes, ...) and
# .whl-trl/ (trl==1.12.0 for the PPO baseline, installed apart so the two TRLs never meet).
# The models resolve offline as everywhere else (STACKLLAMA_CACHE: a cache folder carried along).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/stackllama-site .whl/*.whl
  export PYTHONPATH=/tmp/stackllama-site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .whl-trl ] && ls .whl-trl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/trl-1.12-site .whl-trl/*.whl
  # bench_ppo's TRL side: the same interpreter with trl 1.12 first on the path
  printf '#!/bin/sh\nPYTHONPATH=/tmp/trl-1.12-site:%s exec %s "$@"\n' "${PYTHONPATH:-}" "$(command -v "$PY")" > /tmp/trl-1.12-python
  chmod +x /tmp/trl-1.12-python
  export STACKLLAMA_TRL_PYTHON=/tmp/trl-1.12-python
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the package from the working tree, not an install
exec "$PY" bench/gpu_check.py "$@"
