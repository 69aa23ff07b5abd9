#!/usr/bin/env bash
# Download, on a machine with PyPI access, the wheels that bench/gpu_paradigm.sh installs on a
# GPU machine without network (Python 3.12, x86-64 Linux; torch, numpy, scipy, matplotlib,
# tensorboard, safetensors, PyYAML and tqdm are assumed to be there already). Output: .whl/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${WHEELS:-.whl}
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64)
for spec in monai==1.6.1 nibabel pydicom SimpleITK pydantic pydantic-core annotated-types typing-inspection \
            connected-components-3d; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$spec"
done
ls "$DEST"
