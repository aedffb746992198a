#!/usr/bin/env bash
# Train the built-in model (models/instaflow-emoji): emoji-text at 16×16, 1-RF → reflow pairs →
# one-step distillation, exported in f16. CPU run here: about 1.2 h on 2 cores (shared with other
# jobs). InstaFlow proper adds a second reflow (2-RF) before distilling; see docs/results.md.
# Usage: scripts/train-default-model.sh [RUNS_DIR]; extra CLI flags via $FLAGS.
set -euo pipefail
cd "$(dirname "$0")/.."
R=${1:-runs}
FLAGS=${FLAGS:---backend cpu}
cargo build --release -q -p instaflow-cli
I="./target/release/instaflow $FLAGS"
scripts/fetch-data.sh
mkdir -p "$R"
$I data emoji --size 16 --out "$R/emoji16"
$I train --data "$R/emoji16" --size small --steps 3000 --batch 32 --ema-decay 0.995 --half --out "$R/emoji-1rf"
$I reflow --model "$R/emoji-1rf/model" --data "$R/emoji16" --pairs 3000 --solver euler:16 --out "$R/emoji-pairs-1rf"
$I distill --pairs "$R/emoji-pairs-1rf" --init "$R/emoji-1rf/model" --steps 600 --batch 32 --ema-decay 0.99 --half --out "$R/emoji-1rf-distill"
rm -rf models/instaflow-emoji
cp -r "$R/emoji-1rf-distill/model" models/instaflow-emoji
cp "$R/emoji16/LICENCE.txt" models/instaflow-emoji/LICENCE.txt
