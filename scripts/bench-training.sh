#!/usr/bin/env bash
# Training samples/s and reflow pairs/s of `instaflow` against the same model in PyTorch, measured
# in one run on this machine (docs/results.md). Needs a prepared data set (scripts/fetch-data.sh,
# `instaflow data mnist --size 16 --out runs/mnist16`) and a Python with
# tests/parity/requirements.txt, given as $PYTHON.
# Usage: PYTHON=venv/bin/python scripts/bench-training.sh [DATA_DIR] [--backend cpu]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-runs/mnist16}
shift || true
FLAGS=${*:---backend cpu}
PYTHON=${PYTHON:?set PYTHON to a Python with tests/parity/requirements.txt installed}
cargo build --release -q -p instaflow-cli
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
I="./target/release/instaflow $FLAGS"
$I train --data "$DATA" --size small --steps 21 --batch 64 --checkpoint-every 1000 --out "$W/run" >/dev/null
$I reflow --model "$W/run/model" --data "$DATA" --pairs 256 --batch 64 --chunk 256 --solver euler:16 --out "$W/pairs" | tee "$W/reflow.txt" >/dev/null
rust_train=$(python3 -c "import json;print(json.load(open('$W/run/train.json'))['samples_per_second'])")
rust_pairs=$(sed -n 's/.*(\([0-9.]*\) pairs\/s.*/\1/p' "$W/reflow.txt")
py=$("$PYTHON" tests/parity/bench_train_pytorch.py "$W/run/model" --batch 64 --steps 20 --pairs 256 --euler 16 2>/dev/null | tail -1)
python3 - "$rust_train" "$rust_pairs" "$py" <<'PY'
import json, sys
rt, rp, py = float(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3])
print(f"training (batch 64):      instaflow {rt:7.1f} samples/s   PyTorch {py['train_samples_per_s']:7.1f}   ratio {rt / py['train_samples_per_s']:.2f}")
print(f"pairs (Euler 16, b 64):   instaflow {rp:7.2f} pairs/s     PyTorch {py['pairs_per_s']:7.2f}   ratio {rp / py['pairs_per_s']:.2f}")
PY
