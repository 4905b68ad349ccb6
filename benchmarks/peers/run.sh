#!/usr/bin/env bash
# W1 (shared/DESIGN.md) side by side: Flower + PyTorch (Ray simulation) against
# cohort-sim, run alternately, one table at the end.
#
#   bash benchmarks/peers/run.sh                 # 3 runs of each (default)
#   RUNS=2 bash benchmarks/peers/run.sh          # fewer repetitions (at least 2)
#   ROUNDS=3 bash benchmarks/peers/run.sh        # a quick check, not a figure
#
# 1. A virtual environment in benchmarks/peers/.venv (git-ignored) with the
#    pinned packages of requirements.txt from PyPI (first time: ~6 GB, torch
#    from PyPI comes with its CUDA wheels; ~5 minutes here).
# 2. The data set: /usr/share/datasets/fashion-mnist (Debian package
#    dataset-fashion-mnist; installed with apt-get when missing and root).
# 3. cargo build --release -p cohort-simulator --bin cohort-sim
# 4. compare.py: for each run, Flower, then cohort-sim --backend auto, then
#    cohort-sim --backend dfdx, each after `uptime`, each under
#    /usr/bin/time -v; logs and results.json in benchmarks/peers/results/.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
venv="$here/.venv"
py="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import flwr, torch, ray, psutil, numpy' 2>/dev/null; then
  echo "== virtual environment $venv (pip install -r requirements.txt)"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --progress-bar off -r "$here/requirements.txt"
fi

data=/usr/share/datasets/fashion-mnist
if [ ! -f "$data/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== apt-get install -y dataset-fashion-mnist"
    apt-get update -qq && apt-get install -y dataset-fashion-mnist
  else
    echo "missing $data: apt-get install -y dataset-fashion-mnist (as root)" >&2
    exit 1
  fi
fi
if [ ! -x /usr/bin/time ]; then
  if [ "$(id -u)" = 0 ]; then apt-get install -y time; else echo "missing /usr/bin/time (apt-get install -y time)" >&2; exit 1; fi
fi

echo "== cargo build --release -p cohort-simulator --bin cohort-sim"
(cd "$root" && cargo build --release -p cohort-simulator --bin cohort-sim)

echo "== versions"
"$venv/bin/python" -c 'import sys, flwr, torch, ray, numpy, psutil; print("Python", sys.version.split()[0], "flwr", flwr.__version__, "torch", torch.__version__, "ray", ray.__version__, "numpy", numpy.__version__, "psutil", psutil.__version__)'
"$root/target/release/cohort-sim" --version
rustc --version

exec "$venv/bin/python" "$here/compare.py" --runs "${RUNS:-3}" --rounds "${ROUNDS:-30}" "$@"
