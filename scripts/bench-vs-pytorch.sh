#!/usr/bin/env bash
# Times text encode, UNet forward and VAE decode at SD-1.5 size with `instaflow bench`, and the
# whole `instaflow generate` (load + encode + one UNet step + decode + PNG) on an SD-1.5-size
# diffusers folder with random weights; then the same in PyTorch + diffusers when a Python with
# them is given (PYTHON=…/bin/python), in one run. Prints medians, our/PyTorch ratios, GFLOP/s
# (FLOPs counted by PyTorch's FlopCounterMode) and peak memory.
#   PYTHON=V/bin/python scripts/bench-vs-pytorch.sh [--backend cpu] [--latent 64]
# The stages run twice: as shipped, and with INSTAFLOW_CONV=im2col (3×3 convolutions without the
# Winograd transform), so the two are compared in the same run.
# Environment: REPEATS (default 3) timed runs per stage, ROUNDS (default 1) rounds of ours-then-
# PyTorch (the table shows medians over rounds and each round's ratio), BATCHES (default "1";
# e.g. "1 4") batch sizes of the end-to-end rows, MODEL (a diffusers folder; default: a random SD-1.5 f32 folder
# made once under target/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-target/bench}
repeats=${REPEATS:-3}
rounds=${ROUNDS:-1}
batches=${BATCHES:-1}
mkdir -p "$out"
cargo build --release --locked -q
bin=./target/release/instaflow
python=${PYTHON:-python3}
latent=64
for ((i = 1; i <= $#; i++)); do [ "${!i}" = --latent ] && { j=$((i + 1)); latent=${!j}; }; done
model=${MODEL:-$out/sd15-random-f32}
if [ ! -f "$model/model_index.json" ]; then
    echo "making $model (random SD-1.5 weights, f32, 4.3 GB) …"
    rm -rf "$model"
    $bin random-model --preset sd15 --dtype f32 --seed 1 --out "$model" >/dev/null
fi

have_torch=1
"$python" -c "import torch, diffusers, transformers" 2>/dev/null || have_torch=0
[ $have_torch = 1 ] || echo "PyTorch/diffusers not found for $python (set PYTHON=…): our numbers only"
# Each round runs ours, then PyTorch's: on a shared machine whose speed drifts over minutes, the
# two sides of a ratio are measured close together, and the rounds show the spread.
for ((k = 0; k < rounds; k++)); do
    echo "round $((k + 1))/$rounds — stages: instaflow bench ($repeats runs each) …"
    $bin "$@" bench --latent "$latent" --repeats "$repeats" --json "$out/instaflow-r$k.json" >/dev/null
    echo "stages, 3×3 convolutions as im2col + gemm instead of Winograd ($repeats runs each) …"
    INSTAFLOW_CONV=im2col $bin "$@" bench --latent "$latent" --repeats "$repeats" \
        --json "$out/instaflow-im2col-r$k.json" >/dev/null
    if [ $have_torch = 1 ]; then
        echo "stages: PyTorch ($repeats runs each) …"
        "$python" tests/parity/bench_pytorch.py --latent "$latent" --repeats "$repeats" \
            >"$out/pytorch-r$k.json"
    fi
    for b in $batches; do
        echo "end to end, batch $b: instaflow generate ($repeats runs) …"
        for ((r = 0; r < repeats; r++)); do
            /usr/bin/time -f %M -o "$out/generate-b$b-r$k-$r.rss" \
                $bin "$@" generate "a photo of a cat" --model "$model" --batch "$b" --json \
                --out "$out/generate-b$b.png" >"$out/generate-b$b-r$k-$r.json" 2>/dev/null
        done
        if [ $have_torch = 1 ]; then
            echo "end to end, batch $b: PyTorch + diffusers ($repeats runs) …"
            /usr/bin/time -f %M -o "$out/pytorch-b$b-r$k.rss" \
                "$python" tests/parity/bench_pytorch.py --model "$model" --batch "$b" \
                --repeats "$repeats" --out "$out/pytorch-b$b" >"$out/pytorch-b$b-r$k.json"
        fi
    done
done

python3 - "$out" "$repeats" "$rounds" "$have_torch" $batches <<'PY'
import json, statistics, sys
out, repeats, rounds, have_torch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
batches = sys.argv[5:]
load = lambda path: json.load(open(path))
ours = [load(f"{out}/instaflow-r{k}.json") for k in range(rounds)]
im2col = [load(f"{out}/instaflow-im2col-r{k}.json") for k in range(rounds)]
refs = [load(f"{out}/pytorch-r{k}.json") for k in range(rounds)] if have_torch else None
med = statistics.median
print(f"\ninstaflow: {ours[0]['backend']}   reference: {refs[0]['backend'] if refs else '—'}   "
      f"image {ours[0]['image']}²   median of {repeats} runs in each of {rounds} round(s)")
print(f"{'stage':<22}{'instaflow s':>12}{'PyTorch s':>11}{'ratio':>8}{'GFLOP':>9}{'ours GFLOP/s':>14}"
      f"{'PyTorch GFLOP/s':>17}  ratio per round")
def row(name, a, b=None, flops=None, per_round=None):
    """a, b: per-round seconds (or one value); the row shows their medians."""
    a, b = (med(x) if isinstance(x, list) else x for x in (a, b))
    cells = f"{name:<22}{a:>12.2f}"
    cells += f"{b:>11.2f}{a / b:>8.2f}" if b else f"{'—':>11}{'—':>8}"
    if flops:
        cells += f"{flops / 1e9:>9.1f}{flops / 1e9 / a:>14.1f}" + (f"{flops / 1e9 / b:>17.1f}" if b else "")
    elif per_round and len(per_round) > 1:
        cells += " " * 40
    if per_round and len(per_round) > 1:
        cells += "  " + " ".join(f"{x:.2f}" for x in per_round)
    print(cells)
def stage(name, runs, key):
    mine = [r[f"{key}_s"] for r in runs]
    theirs = [r[f"{key}_s"] for r in refs] if refs else None
    ratios = [x / y for x, y in zip(mine, theirs)] if theirs else None
    row(name, mine, theirs, refs and refs[0].get(f"{key}_flops"), ratios)
for key, name in [("text_encode", "text encode"), ("unet", "UNet forward"), ("vae_decode", "VAE decode")]:
    stage(name, ours, key)
    if key != "text_encode":
        stage("  … im2col convs", im2col, key)
for b in batches:
    totals, loads, rss = [], [], 0
    for k in range(rounds):
        runs = [load(f"{out}/generate-b{b}-r{k}-{r}.json") for r in range(repeats)]
        totals.append(med(r["timings_ms"]["total"] for r in runs) / 1e3)
        loads.append(med(r["timings_ms"]["load"] for r in runs) / 1e3)
        rss = max([rss] + [int(open(f"{out}/generate-b{b}-r{k}-{r}.rss").read().split()[-1])
                           for r in range(repeats)])
    theirs = [load(f"{out}/pytorch-b{b}-r{k}.json") for k in range(rounds)] if have_torch else None
    their_totals = [t["end_to_end_s"] for t in theirs] if theirs else None
    ratios = [x / y for x, y in zip(totals, their_totals)] if theirs else None
    row(f"end to end, batch {b}", totals, their_totals, per_round=ratios)
    row("  folder load", loads, theirs and [t["stages_s"]["load"] for t in theirs])
    t = f"{int(b) / med(their_totals):.3f}" if theirs else "—"
    print(f"  images/s: instaflow {int(b) / med(totals):.3f}, PyTorch {t}")
    their_rss = theirs and max(int(open(f"{out}/pytorch-b{b}-r{k}.rss").read().split()[-1])
                               for k in range(rounds)) / 1024 ** 2
    row("  peak RSS GiB", rss / 1024 ** 2, their_rss)
row("bench peak RSS GiB", max(r["peak_rss_mib"] for r in ours) / 1024,
    refs and max(r["peak_rss_mib"] for r in refs) / 1024)
PY
