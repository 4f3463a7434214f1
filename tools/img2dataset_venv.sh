#!/usr/bin/env bash
# img2dataset in a virtualenv of its own (it pins webdataset<0.3, vlp pins 1.0.2), for the
# tests that write shards with the real img2dataset. Usage: tools/img2dataset_venv.sh [DIR]
# (default .bench/img2dataset-venv); does nothing when DIR already has it.
set -euo pipefail
venv="${1:-$(cd "$(dirname "$0")/.." && pwd)/.bench/img2dataset-venv}"
[ -x "$venv/bin/img2dataset" ] && exit 0
python3 -m venv --clear "$venv"
"$venv/bin/pip" install -q img2dataset==1.47.0
