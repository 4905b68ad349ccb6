#!/usr/bin/env bash
# Regenerates the README's picture: runs the default experiment (W0, seed 42,
# the same numbers on any machine) and copies its accuracy chart to docs/.
set -euo pipefail
cd "$(dirname "$0")/.."
last=$(cargo run --release -q -p cohort-simulator --bin cohort-sim -- --quiet | tail -n 1)
dir=${last#results in }
cp "$dir/plots/accuracy.svg" docs/w0-accuracy.svg
echo "docs/w0-accuracy.svg from $dir"
