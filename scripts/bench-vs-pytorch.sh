#!/usr/bin/env bash
# Times text encode, UNet forward and VAE decode at SD-1.5 size with `instaflow bench`, and the
# whole `instaflow generate` (load + encode + one UNet step + decode + PNG) on an SD-1.5-size
# diffusers folder with random weights; then the same in PyTorch + diffusers when a Python with
# them is given (PYTHON=…/bin/python), in one run. Prints medians, our/PyTorch ratios, GFLOP/s
# (FLOPs counted by PyTorch's FlopCounterMode) and peak memory.
#   PYTHON=V/bin/python scripts/bench-vs-pytorch.sh [--backend cpu] [--latent 64]
# The stages run twice: as shipped, and with INSTAFLOW_CONV=im2col (3×3 convolutions without the
# Winograd transform), so the two are compared in the same run.
# Environment: REPEATS (default 3) timed runs per stage, BATCHES (default "1"; e.g. "1 4") batch
# sizes of the end-to-end rows, MODEL (a diffusers folder; default: a random SD-1.5 f32 folder
# made once under target/bench).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-target/bench}
repeats=${REPEATS:-3}
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

echo "stages: instaflow bench ($repeats runs each) …"
$bin "$@" bench --latent "$latent" --repeats "$repeats" --json "$out/instaflow.json" >/dev/null
echo "stages, 3×3 convolutions as im2col + gemm instead of Winograd ($repeats runs each) …"
INSTAFLOW_CONV=im2col $bin "$@" bench --latent "$latent" --repeats "$repeats" \
    --json "$out/instaflow-im2col.json" >/dev/null
for b in $batches; do
    echo "end to end, batch $b: instaflow generate ($repeats runs) …"
    for ((r = 0; r < repeats; r++)); do
        /usr/bin/time -f %M -o "$out/generate-b$b-$r.rss" \
            $bin "$@" generate "a photo of a cat" --model "$model" --batch "$b" --json \
            --out "$out/generate-b$b.png" >"$out/generate-b$b-$r.json" 2>/dev/null
    done
done

have_torch=1
"$python" -c "import torch, diffusers, transformers" 2>/dev/null || have_torch=0
if [ $have_torch = 1 ]; then
    echo "stages: PyTorch ($repeats runs each) …"
    "$python" tests/parity/bench_pytorch.py --latent "$latent" --repeats "$repeats" >"$out/pytorch.json"
    for b in $batches; do
        echo "end to end, batch $b: PyTorch + diffusers ($repeats runs) …"
        /usr/bin/time -f %M -o "$out/pytorch-b$b.rss" \
            "$python" tests/parity/bench_pytorch.py --model "$model" --batch "$b" --repeats "$repeats" \
            --out "$out/pytorch-b$b" >"$out/pytorch-b$b.json"
    done
else
    echo "PyTorch/diffusers not found for $python (set PYTHON=…): our numbers only"
fi

python3 - "$out" "$repeats" "$have_torch" $batches <<'PY'
import json, statistics, sys
out, repeats, have_torch, batches = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4:]
ours = json.load(open(f"{out}/instaflow.json"))
ref = json.load(open(f"{out}/pytorch.json")) if have_torch else None
print(f"\ninstaflow: {ours['backend']}   reference: {ref['backend'] if ref else '—'}   "
      f"image {ours['image']}²   median of {repeats}")
print(f"{'stage':<22}{'instaflow s':>12}{'PyTorch s':>11}{'ratio':>8}{'GFLOP':>9}{'ours GFLOP/s':>14}{'PyTorch GFLOP/s':>17}")
def row(name, a, b=None, flops=None):
    cells = f"{name:<22}{a:>12.2f}"
    cells += f"{b:>11.2f}{a / b:>8.2f}" if b else f"{'—':>11}{'—':>8}"
    if flops:
        cells += f"{flops / 1e9:>9.1f}{flops / 1e9 / a:>14.1f}" + (f"{flops / 1e9 / b:>17.1f}" if b else "")
    print(cells)
im2col = json.load(open(f"{out}/instaflow-im2col.json"))
for key, name in [("text_encode", "text encode"), ("unet", "UNet forward"), ("vae_decode", "VAE decode")]:
    row(name, ours[f"{key}_s"], ref and ref[f"{key}_s"], ref and ref.get(f"{key}_flops"))
    if key != "text_encode":
        row("  … im2col convs", im2col[f"{key}_s"], ref and ref[f"{key}_s"], ref and ref.get(f"{key}_flops"))
for b in batches:
    runs = [json.load(open(f"{out}/generate-b{b}-{r}.json")) for r in range(repeats)]
    total = statistics.median(r["timings_ms"]["total"] for r in runs) / 1e3
    load = statistics.median(r["timings_ms"]["load"] for r in runs) / 1e3
    rss = max(int(open(f"{out}/generate-b{b}-{r}.rss").read().split()[-1]) for r in range(repeats)) / 1024
    theirs = json.load(open(f"{out}/pytorch-b{b}.json")) if have_torch else None
    row(f"end to end, batch {b}", total, theirs and theirs["end_to_end_s"])
    row(f"  folder load", load, theirs and theirs["stages_s"]["load"])
    t = f"{int(b) / theirs['end_to_end_s']:.3f}" if theirs else "—"
    print(f"  images/s: instaflow {int(b) / total:.3f}, PyTorch {t}")
    if theirs:
        their_rss = int(open(f"{out}/pytorch-b{b}.rss").read().split()[-1]) / 1024
        row(f"  peak RSS GiB", rss / 1024, their_rss / 1024)
    else:
        row(f"  peak RSS GiB", rss / 1024)
row("bench peak RSS GiB", ours["peak_rss_mib"] / 1024, ref and ref["peak_rss_mib"] / 1024)
PY
