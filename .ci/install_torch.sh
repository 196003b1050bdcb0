#!/usr/bin/env bash
# Install $TORCH_PIN with the pip given as $1: the torch wheel alone from PyTorch's CPU index
# ($TORCH_INDEX; empty: the usual index), then its dependencies from the usual index. Only the one
# package is looked up on the CPU index, so a machine that cannot reach it (one with the wheel on
# local disk) does not retry it for every dependency.
set -euo pipefail
pip=$1
: "${TORCH_PIN:=torch==2.13.0+cpu}" "${TORCH_INDEX=https://download.pytorch.org/whl/cpu}"
"$pip" install -q --no-deps ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "$TORCH_PIN"
"$pip" install -q "$TORCH_PIN"
