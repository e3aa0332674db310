#!/usr/bin/env bash
# The one-shot accelerator suite (bench/accelerator_suite.py): run it on a lent GPU or TPU
# machine from the repository root; it stops itself after 9 minutes (its sweep part after
# --sweep_timeout seconds), and its results files hold every part finished by then.
#   bench/accelerator_suite.sh              full shapes; figures in ${OUT:-accelerator_suite_out}/
#   bench/accelerator_suite.sh --dry_run    tiny shapes on CPU (the sweep on 8 fake devices):
#                                           checks that the suite works
# Python: $PYTHON, else ./.venv/bin/python (`./elm version` makes it), else python3. On a GPU
# machine JAX needs its CUDA plugin (pip install 'jax[cuda12]'), which the suite does not install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
OUT=${OUT:-accelerator_suite_out}
exec timeout 540 "$PY" bench/accelerator_suite.py --out "$OUT" "$@"
