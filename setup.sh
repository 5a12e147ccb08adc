#!/usr/bin/env bash
# One setup path for users, the README and CI: a virtual environment in .venv with the right torch
# build for this machine, then the project and its test dependencies in a single pip command
# (installing moto later would break the botocore pin that s3fs needs).
#
#   ./setup.sh            # core + test extras
#   R2D3_EXTRAS=test,gpu ./setup.sh
#   R2D3_VENV=/path/venv ./setup.sh
set -euo pipefail
cd "$(dirname "$0")"
VENV=${R2D3_VENV:-.venv}
EXTRAS=${R2D3_EXTRAS:-test}
PY=${PYTHON:-python3}
TORCH_VERSION=${R2D3_TORCH_VERSION:-2.13.0}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"

# Re-running is cheap: skip when the same pyproject and extras were installed already.
stamp="$VENV/.r2d3-setup-$(cat pyproject.toml setup.sh | sha1sum | cut -c1-12)-${EXTRAS//,/_}"
if [ -f "$stamp" ]; then
  echo "setup: $VENV is up to date"
  exit 0
fi

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing the CUDA build of torch"
    $PIP install "torch>=2.3"
  else
    echo "setup: no NVIDIA GPU, installing the CPU build of torch $TORCH_VERSION"
    # A wheel on local disk (pip's find-links) wins; otherwise PyTorch's CPU index.
    # Its dependencies come from the normal index afterwards.
    if $PIP install --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
      $PIP install "torch==$TORCH_VERSION"
    else
      $PIP install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple
    fi
  fi
fi

$PIP install -e ".[${EXTRAS}]"
"$VENV/bin/python" -c "import r2d3, torch; print('setup: r2d3', r2d3.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
rm -f "$VENV"/.r2d3-setup-*
touch "$stamp"
