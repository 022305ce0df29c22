#!/usr/bin/env bash
# The test command: install (scripts/install.sh), lint (ruff) and run the whole suite on CPU.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k equivalence`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
VENV=${JAM_VENV:-.venv}
PY=python3
[ "$VENV" != "none" ] && PY="$VENV/bin/python"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# The linter first (ruff, configured in pyproject.toml): a finding fails the run before any test starts.
echo "[test] ruff check"
"$PY" -m ruff check .
# pytest exits 5 when it collects no test: that is a failure here, not a pass.
exec "$PY" -m pytest tests -q -p no:cacheprovider --durations=10 "$@"
