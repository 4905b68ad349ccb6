#!/usr/bin/env bash
# Reference epsilons of the Poisson-sampled Gaussian mechanism from Google's
# dp-accounting (PyPI), for aggregator/tests/privacy.rs. Creates its own venv,
# so it needs only python3 and PyPI. Run from the repository root:
#   benchmarks/dp/make_fixtures.sh
# It rewrites aggregator/tests/fixtures/dp_accounting.json; the tests read
# that committed file only.
set -euo pipefail
VENV="${DP_VENV:-${TMPDIR:-/tmp}/cohort-dp-venv}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "dp-accounting==0.6.0"
OUT="aggregator/tests/fixtures/dp_accounting.json"
mkdir -p "$(dirname "$OUT")"
"$VENV/bin/python" benchmarks/dp/make_fixtures.py > "$OUT"
echo "wrote $OUT"
