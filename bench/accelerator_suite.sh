#!/usr/bin/env bash
# The one-shot accelerator suite (bench/accelerator_suite.py): run it on a lent GPU or TPU
# machine from the repository root; it stops itself after 8 minutes.
#   bench/accelerator_suite.sh              full shapes; figures in ${OUT:-accelerator_suite_out}/
#   bench/accelerator_suite.sh --dry_run    tiny shapes on CPU: checks that the suite works
# Python: $PYTHON, else ./.venv/bin/python (`./elm version` makes it), else python3. On a GPU
# machine JAX needs its CUDA plugin (pip install 'jax[cuda12]'), which the suite does not install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-accelerator_suite_out}
exec timeout 480 "$PY" bench/accelerator_suite.py --out "$OUT" "$@"
