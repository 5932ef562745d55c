#!/usr/bin/env bash
# Download the wheels gpu_check.sh installs on a GPU machine without network into benchmarks/wheels/
# (git-ignored, about 1 MiB): the peers the GPU image lacks, pure-Python wheels for CPython 3.10+.
#   bash benchmarks/fetch_wheels.sh [DIR]
set -euo pipefail
DIR="${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/wheels}"
PEERS=("liger-kernel==0.8.5" "cut-cross-entropy==25.1.1")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    -d "$DIR" "${PEERS[@]}"
ls -l "$DIR"
