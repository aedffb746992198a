#!/usr/bin/env bash
# The MNIST-text experiment of docs/results.md: 1-RF → reflow → 2-RF, distillation of both into
# one-step generators, and the evaluation table. CPU run here: about 1.5 h on 2 cores.
# Usage: scripts/mnist-experiment.sh [RUNS_DIR]   (default runs/); extra CLI flags via $FLAGS,
# e.g. FLAGS="--backend cuda".
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-runs}
FLAGS=${FLAGS:---backend cpu}
cargo build --release -q -p instaflow-cli
I="./target/release/instaflow $FLAGS"
scripts/fetch-data.sh
mkdir -p "$R"
$I data mnist --size 16 --out "$R/mnist16"
# 1-RF from (noise, image) draws; captions dropped 10% of the time.
$I train --data "$R/mnist16" --size small --steps 1200 --batch 64 --ema-decay 0.995 --out "$R/mnist-1rf"
# Reflow: pairs (X0, ODE[1-RF](X0 | T)) with captions of the data as D_T, then 2-RF from them.
$I reflow --model "$R/mnist-1rf/model" --data "$R/mnist16" --pairs 3000 --solver euler:16 --out "$R/mnist-pairs-1rf"
$I train --pairs "$R/mnist-pairs-1rf" --init "$R/mnist-1rf/model" --steps 600 --batch 64 --ema-decay 0.995 --out "$R/mnist-2rf"
$I reflow --model "$R/mnist-2rf/model" --data "$R/mnist16" --pairs 3000 --solver euler:16 --out "$R/mnist-pairs-2rf"
# One-step students, each initialised from its teacher and trained on the teacher's pairs.
$I distill --pairs "$R/mnist-pairs-1rf" --init "$R/mnist-1rf/model" --steps 400 --batch 64 --ema-decay 0.99 --out "$R/mnist-1rf-distill"
$I distill --pairs "$R/mnist-pairs-2rf" --init "$R/mnist-2rf/model" --steps 400 --batch 64 --ema-decay 0.99 --out "$R/mnist-2rf-distill"
$I eval --data "$R/mnist16" --samples 1000 --steps 1,2,4,25 \
    --model "1-RF=$R/mnist-1rf/model" --model "2-RF=$R/mnist-2rf/model" \
    --student "1-RF+distill=$R/mnist-1rf-distill/model" --student "2-RF+distill=$R/mnist-2rf-distill/model" \
    --out "$R/mnist-eval"
