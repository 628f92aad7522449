#!/usr/bin/env bash
# The GPU runner: every GPU check and measurement in a few commands (benchmarks/README.md).
#
#   bash benchmarks/gpu.sh STAGE OUTDIR [OPTIONS]   one stage on a CUDA GPU: tests, kernels, engine, probes, hessian, study
#   bash benchmarks/gpu.sh --dry-run OUTDIR         every stage at tiny sizes on the CPU; exit 0 only if all work
#   bash benchmarks/gpu.sh --help                   the stages and options
#
# It runs on the machine's own Python (FASTLAND_PYTHON, else .venv/bin/python, else python3) and installs
# nothing from the network. Where fastland itself is not importable (the GPU image), it is installed from this
# tree, editable and offline, without dependencies. The stage logic is benchmarks/gpu_stages.py.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

if [ -n "${FASTLAND_PYTHON:-}" ]; then
  PY=$FASTLAND_PYTHON
elif [ -x .venv/bin/python ]; then
  PY=.venv/bin/python
else
  PY=python3
fi
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "error: no Python found ($PY); set FASTLAND_PYTHON to the interpreter that has torch" >&2
  exit 2
fi
if [ $# -eq 0 ]; then
  echo "error: usage: bash benchmarks/gpu.sh STAGE OUTDIR | bash benchmarks/gpu.sh --dry-run OUTDIR (see --help)" >&2
  exit 2
fi

# fastland with its kernels and viz subpackages (mapped from kernels/ and viz/ by pyproject.toml), from this tree.
where='import fastland.kernels as k, fastland.viz as v, fastland as f, os; print(*(os.path.dirname(os.path.dirname(m.__file__)) for m in (f, k, v)))'
if ! found=$("$PY" -c "$where" 2>/dev/null); then
  echo "gpu.sh: fastland is not installed for $PY: installing this tree (editable, offline, no dependencies)"
  if ! "$PY" -m pip install --quiet --no-deps --no-build-isolation --no-index --editable . ; then
    echo "error: could not install fastland from $(pwd) with $PY (pip, setuptools>=68 needed); install it by hand" >&2
    exit 2
  fi
  found=$("$PY" -c "$where")
fi
for dir in $found; do
  if [ "$(cd "$dir" && pwd -P)" != "$(pwd -P)" ]; then
    echo "error: $PY imports fastland from $dir, not from this tree $(pwd); run 'pip install -e .' here or set FASTLAND_PYTHON" >&2
    exit 2
  fi
done

export PYTHONUNBUFFERED=1
if [ "$1" = "--dry-run" ]; then
  shift
  exec "$PY" benchmarks/gpu_stages.py all "$@" --dry-run
fi
exec "$PY" benchmarks/gpu_stages.py "$@"
