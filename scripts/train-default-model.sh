#!/usr/bin/env bash
# Train the built-in model: shapes-text at 32×32 (8 shapes × 8 colours drawn by `instaflow data
# shapes`), InstaFlow's pipeline 1-RF → reflow pairs → 2-RF → pairs → one-step distillation.
#
# On a 2-core CPU the pipeline takes several working sessions, so it runs in stages; each stage
# ends by copying its exported model (f16) to models/stages/NAME, which is committed, so the next
# stage can start on any machine. A stage that is cut off continues with the same command
# (`--resume` from its run folder's checkpoint when the folder is still there).
#
# Usage: scripts/train-default-model.sh STAGE [RUNS_DIR]
#   $FLAGS: global CLI flags (default --backend cpu); $DEVICES: training devices (default cpu:2,
#   two CPU workers — the same batch and the same losses as one, 1.6× faster here);
#   $DISTILL_SEED: training seed of the distill stages (default 3).
#   data     draw the training set (64,000 images, seed 0) and the evaluation set (19,200, seed 1)
#   1rf      1-RF from scratch: 800 steps, batch 64, on independent (noise, image) draws (one
#            session here; the learning rate is constant after warm-up, so a longer run cut at
#            step 800 is the same run)                                       → models/stages/1-rf
#   1rf-2    1-RF continued from models/stages/1-rf (--init: the weights; AdamW's moments and the
#            warm-up start afresh; seed 1: other draws than stage 1's): 2,000 more steps at
#            batch 64 (one session here, cut at step 2000 as stage 1)       → models/stages/1-rf-2
#   pairs-1  8,192 reflow pairs from models/stages/1-rf-2 (25 Euler steps, guidance 1.5), in
#            $SHARDS (default 2) processes of one thread each: on two cores 2× the pairs per
#            second of one process with two threads (small tensors; 50 min here) → $R/pairs-1rf
#   2rf      2-RF: models/stages/1-rf-2 fine-tuned on those pairs                → models/stages/2-rf
#   distill-1rf  1-RF+distill: models/stages/1-rf-2 distilled on the pairs-1 set, 1,000 steps
#            at batch 64 (the learning rate is constant after warm-up)  → models/stages/1-rf-distill
#   pairs-2  8,192 pairs from models/stages/2-rf at guidance 1 (2-RF learned the guided teacher's
#            distribution already, so both students aim at the same one) with 8 Euler steps, not
#            25: 2-RF's paths are nearly straight (4 and 25 steps give the same class accuracy and
#            FD within their noise), and less exact targets can only handicap this student
#                                                                                  → $R/pairs-2rf
#   distill-2rf  2-RF+distill (InstaFlow): models/stages/2-rf distilled on pairs-2, as distill-1rf
#                                                                   → models/stages/2-rf-distill
#   builtin  install models/stages/2-rf-distill, InstaFlow proper (one network evaluation: 93.8% /
#            95.3% class, 99.5% colour over the 48 prompts × 8 seeds on two evaluation noises,
#            docs/results.md) as the built-in model → models/instaflow-shapes
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: $0 data|1rf|1rf-2|pairs-1|2rf|distill-1rf|pairs-2|distill-2rf|builtin [RUNS_DIR]}
R=${2:-runs}
FLAGS=${FLAGS:---backend cpu}
DEVICES=${DEVICES:-cpu:2}
SHARDS=${SHARDS:-2}
# Training seed of both distillations; another seed (a second run, to measure training noise)
# goes to its own run folder and stage name (…-seedN).
DISTILL_SEED=${DISTILL_SEED:-3}
RUN=$([ "$DISTILL_SEED" = 3 ] || echo "-seed$DISTILL_SEED")
cargo build --release -q -p instaflow-cli
I="./target/release/instaflow $FLAGS"
mkdir -p "$R" models/stages

# Run `instaflow $1` (train or distill) into run folder $2 with the remaining arguments; resume
# when a checkpoint is there.
fit() {
  local cmd=$1 out=$2
  shift 2
  local resume=()
  [ -d "$out/checkpoint" ] && resume=(--resume)
  $I "$cmd" --out "$out" "${resume[@]}" "$@"
}

# 8,192 reflow pairs from model $1 into $2 at guidance $3 with $4 Euler steps, one one-thread
# process per shard.
pairs() {
  local pids=() s
  for s in $(seq 0 $((SHARDS - 1))); do
    RAYON_NUM_THREADS=1 $I reflow --model "$1" --data "$R/shapes32" --out "$2" --pairs 8192 \
      --solver "euler:$4" --guidance "$3" --batch 128 --chunk 256 --shard "$s/$SHARDS" &
    pids+=($!)
  done
  for s in "${pids[@]}"; do wait "$s"; done
}
# Copy a run's exported model to models/stages/$2.
keep() {
  rm -rf "models/stages/$2"
  cp -r "$1/model" "models/stages/$2"
  cp "$R/shapes32/prompts.json" "models/stages/$2/prompts.json"
}

case $STAGE in
  data)
    [ -d "$R/shapes32" ] || $I data shapes --size 32 --per-class 1000 --seed 0 --out "$R/shapes32"
    [ -d "$R/shapes32-eval" ] || $I data shapes --size 32 --per-class 300 --seed 1 --out "$R/shapes32-eval"
    ;;
  1rf)
    "$0" data "$R"
    # --pooled-text: without it, 800 steps from scratch had not learned to follow the prompt at
    # all (the same image for "a red circle" and "a blue square"; docs/results.md).
    fit train "$R/shapes-1rf" --data "$R/shapes32" --size small --pooled-text --steps 800 --batch 64 \
      --ema-decay 0.999 --devices "$DEVICES" --checkpoint-every 100 --half
    keep "$R/shapes-1rf" 1-rf
    ;;
  1rf-2)
    "$0" data "$R"
    fit train "$R/shapes-1rf-2" --init models/stages/1-rf --data "$R/shapes32" --steps 2000 \
      --seed 1 --batch 64 --ema-decay 0.999 --devices "$DEVICES" --checkpoint-every 100 --half
    keep "$R/shapes-1rf-2" 1-rf-2
    ;;
  pairs-1)
    "$0" data "$R"
    pairs models/stages/1-rf-2 "$R/pairs-1rf" 1.5 25
    ;;
  pairs-2)
    [ -d models/stages/2-rf ] || "$0" 2rf "$R"
    pairs models/stages/2-rf "$R/pairs-2rf" 1 8
    ;;
  2rf)
    "$0" pairs-1 "$R"
    fit train "$R/shapes-2rf" --init models/stages/1-rf-2 --pairs "$R/pairs-1rf" --steps 1500 \
      --seed 2 --batch 64 --ema-decay 0.999 --devices "$DEVICES" --checkpoint-every 100 --half
    keep "$R/shapes-2rf" 2-rf
    ;;
  distill-1rf)
    "$0" pairs-1 "$R"
    fit distill "$R/shapes-1rf-distill$RUN" --init models/stages/1-rf-2 --pairs "$R/pairs-1rf" --steps 1000 \
      --seed "$DISTILL_SEED" --batch 64 --ema-decay 0.999 --devices "$DEVICES" --checkpoint-every 100 --half
    keep "$R/shapes-1rf-distill$RUN" "1-rf-distill$RUN"
    ;;
  distill-2rf)
    "$0" pairs-2 "$R"
    fit distill "$R/shapes-2rf-distill$RUN" --init models/stages/2-rf --pairs "$R/pairs-2rf" --steps 1000 \
      --seed "$DISTILL_SEED" --batch 64 --ema-decay 0.999 --devices "$DEVICES" --checkpoint-every 100 --half
    keep "$R/shapes-2rf-distill$RUN" "2-rf-distill$RUN"
    ;;
  builtin)
    [ -d models/stages/2-rf-distill ] || "$0" distill-2rf "$R"
    rm -rf models/instaflow-shapes
    cp -r models/stages/2-rf-distill models/instaflow-shapes
    ;;
  *)
    echo "unknown stage $STAGE" >&2
    exit 2
    ;;
esac
