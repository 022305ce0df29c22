#!/usr/bin/env bash
# Install megatron-jam into a virtual environment (default: ./.venv; set JAM_VENV, or
# JAM_VENV=none to use the active Python). Idempotent: a second run only re-checks.
#
# torch: an existing torch is left alone (GPU clusters bring their own CUDA build).
# Without one, and without a GPU, the CPU build 2.13.0 is pinned: a plain
# `pip install torch` would pull gigabytes of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${JAM_VENV:-.venv}
if [ "$VENV" != "none" ]; then
  if [ ! -x "$VENV/bin/python" ]; then
    echo "[install] creating virtual environment $VENV"
    "$PY" -m venv "$VENV"
  fi
  PY="$VENV/bin/python"
fi
PIP=("$PY" -m pip --disable-pip-version-check -q)

# Up to date? The stamp is a hash of what the install depends on (package metadata and the C++ sources);
# when it matches and the package imports, nothing is reinstalled or rebuilt (JAM_FORCE_INSTALL=1 forces it).
STAMP_DIR=$("$PY" -c 'import sys; print(sys.prefix)')
STAMP="$STAMP_DIR/.megatron-jam-install"
WANT=$( (cat setup.py pyproject.toml; find csrc -type f | sort | xargs cat) 2>/dev/null | sha256sum | cut -d' ' -f1)
REPO=$(pwd)
if [ -z "${JAM_FORCE_INSTALL:-}" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
   && PY_ABS=$("$PY" -c 'import sys; print(sys.executable)') \
   && (cd / && "$PY_ABS" -c "import torch, megatron_jam, megatron_jam._C, megatron.core, os, sys
sys.exit(os.path.dirname(os.path.dirname(megatron_jam.__file__)) != '$REPO')") >/dev/null 2>&1; then
  echo "[install] up to date (setup.py, pyproject.toml and csrc/ unchanged; JAM_FORCE_INSTALL=1 reinstalls)"
  exit 0
fi

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[install] GPU found and no torch: installing torch (CUDA build)"
    "${PIP[@]}" install torch
  else
    echo "[install] no GPU and no torch: installing the CPU build torch==2.13.0"
    "${PIP[@]}" install "torch==2.13.0+cpu" 2>/dev/null \
      || "${PIP[@]}" install "torch==2.13.0" --index-url "${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
  fi
else
  echo "[install] keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
fi

echo "[install] installing megatron-jam (builds the C++ extension in csrc/)"
set +o pipefail
"${PIP[@]}" install -e ".[test]" 2>&1 | { grep -v "^WARNING: Location" || true; }
PIP_STATUS=${PIPESTATUS[0]}
set -o pipefail
if [ "$PIP_STATUS" -ne 0 ]; then echo "[install] pip install -e .[test] failed (exit $PIP_STATUS)" >&2; exit 1; fi
"$PY" -c "import megatron_jam, megatron_jam._C, megatron.core; print('[install] ok: megatron-core', megatron.core.__version__)"
echo "$WANT" > "$STAMP" 2>/dev/null || echo "[install] note: cannot write $STAMP; the next run re-checks the install"
