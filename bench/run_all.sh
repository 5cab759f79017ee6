#!/usr/bin/env bash
# One command for a GPU session (see bench/README.md):
#   bash bench/run_all.sh            # GPU: every benchmark, results to bench/results/ (and packed
#                                    # into $OUT/results.tgz on the device machine)
#   bash bench/run_all.sh --smoke    # CPU: tiny shapes, results to /tmp
# Installs the carried Opacus wheel (bench/wheels/*.whl) when opacus is missing, then runs
# `python3 -m bench "$@"` with its output also written to $OUT/bench.log (or /tmp/bench.log).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if ! "$PY" -c "import opacus" 2>/dev/null; then
  if compgen -G "bench/wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/bench-site bench/wheels/*.whl \
      && export PYTHONPATH="/tmp/bench-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "note: opacus is not installed and bench/wheels/ holds no wheel: the Opacus modes will report 'failed'"
  fi
fi

LOG="${OUT:+$OUT/bench.log}"
LOG="${LOG:-/tmp/bench.log}"
# the result files go to bench/results/ here and come back packed in one archive: $OUT returns at
# most 8 files, and the scripts write two each
RETURN_DIR="${OUT:-}"
MARKER=$(mktemp)
{
  echo "# $(date -u '+%Y-%m-%d %H:%M:%S UTC')  commit $(git rev-parse --short HEAD 2>/dev/null || echo "${DPKERNELS_COMMIT:-?} (from \$DPKERNELS_COMMIT)")"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  "$PY" -c "import opacus; print('opacus', opacus.__version__)" 2>/dev/null || echo "opacus: not importable"
  env -u OUT "$PY" -m bench "$@"
} 2>&1 | tee "$LOG"
rc="${PIPESTATUS[0]}"
if [ -n "$RETURN_DIR" ]; then
  find bench/results -type f -newer "$MARKER" \( -name '*.md' -o -name '*.json' \) -printf '%P\n' \
    | tar czf "$RETURN_DIR/results.tgz" -C bench/results -T -
  echo "packed $(tar tzf "$RETURN_DIR/results.tgz" | wc -l) result files into \$OUT/results.tgz"
fi
rm -f "$MARKER"
exit "$rc"
