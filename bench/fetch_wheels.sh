#!/usr/bin/env bash
# Fetch the small wheels bench/gpu_check.sh installs on a bare CUDA machine (Python 3.12, x86_64,
# only PyTorch): megatron-core and the config stack. About 2.8 MB; bench/wheels/ is git-ignored,
# so carry it with the working tree (device tool: carry ["bench/wheels"]).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
mkdir -p wheels
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    -d wheels megatron-core==0.19.2 omegaconf==2.3.0 hydra-core==1.3.2
# antlr4-python3-runtime 4.9.3 (omegaconf's parser) is published as an sdist only: build its wheel here
"$PY" -m pip wheel -q --no-deps -w wheels antlr4-python3-runtime==4.9.3
ls -la wheels
